"""Writing token stores: one shard per call site, many call sites in parallel, one manifest last.

A distributed tokenize stage runs one :class:`ShardWriter` (or a rolling
:class:`StoreWriter` with a partition prefix) per input partition, each in its
own Ray task; names derive from the partition, so a retried task overwrites its
own files instead of adding duplicates. The driver then calls
:func:`write_manifest` with the returned :class:`ShardInfo` objects. Until the
manifest exists the store does not: a crash at any point leaves nothing a reader
would accept.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from arpipe.pipeline.storage import is_s3, storage_for
from arpipe.schemas.store import (
    ShardInfo,
    StoreManifest,
    StoreTotals,
    TokenizerRef,
    VocabLayout,
    valid_shard_name,
)

from .format import (
    CHECKSUM_ALGORITHM,
    FORMAT_VERSION,
    INDEX_SCHEMA,
    MANIFEST,
    StoreError,
    bin_name,
    checksum,
    dtype_for_vocab,
    index_name,
    info_name,
    new_hasher,
    numpy_dtype,
    shard_uri,
    store_digest,
)


def _as_array(tokens: Any) -> np.ndarray:
    if hasattr(tokens, "detach"):  # a torch tensor; avoid importing torch here
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _discard_spool(spool, path: str) -> None:
    spool.close()
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class ShardWriter:
    """Writes one shard: ``shard-<name>.bin``, ``shard-<name>.idx.arrow`` and the ``shard-<name>.json`` sidecar.

    Tokens stream to a spool file (beside the target for local stores, so the
    commit is a rename; in the temp folder for S3, uploaded on commit), hashed as
    they are written. Nothing is visible under the final names before
    :meth:`commit`. Used as a context manager it commits on success and discards
    the spool on an exception.
    """

    def __init__(self, store_uri: str, name: str, *, vocab_size: int | None = None, dtype: str | None = None):
        if not valid_shard_name(name):
            raise StoreError(f"shard name {name!r} is not allowed", where=store_uri,
                             fix="use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit")
        if vocab_size is None and dtype is None:
            raise StoreError("a shard writer needs vocab_size or dtype", where=store_uri,
                             fix="pass vocab_size=<tokenizer codebook size>")
        expected = dtype_for_vocab(vocab_size) if vocab_size is not None else None
        if dtype is not None and expected is not None and dtype != expected:
            raise StoreError(f"dtype {dtype} does not match vocab_size {vocab_size} (needs {expected})",
                             where=store_uri, fix="omit dtype; it follows from vocab_size")
        self.store_uri = store_uri
        self.name = name
        self.dtype = dtype or expected
        self.np_dtype = numpy_dtype(self.dtype)
        self.vocab_size = vocab_size
        self.token_limit = vocab_size if vocab_size is not None else int(np.iinfo(self.np_dtype).max) + 1
        self.bin_uri = shard_uri(store_uri, bin_name(name))
        self._storage = storage_for(store_uri)
        self._local_dir = self._storage.local_path(store_uri)
        if self._local_dir is not None:
            self._local_dir.mkdir(parents=True, exist_ok=True)
        spool_dir = str(self._local_dir) if self._local_dir is not None else None
        fd, self._spool_path = tempfile.mkstemp(prefix=f".{bin_name(name)}.", suffix=".tmp", dir=spool_dir)
        self._spool = os.fdopen(fd, "wb")
        # a writer dropped without commit() or abort() (a killed task's frame) leaves no spool behind
        self._cleanup = weakref.finalize(self, _discard_spool, self._spool, self._spool_path)
        self._hasher = new_hasher()
        self._columns: dict[str, list] = {f.name: [] for f in INDEX_SCHEMA}
        self._keys: set[str] = set()
        self.samples = 0
        self.tokens = 0
        self.done = False

    @property
    def bytes(self) -> int:
        return self.tokens * self.np_dtype.itemsize

    def append(
        self,
        tokens: Any,
        *,
        key: str,
        modality: str,
        shape: tuple[int, ...] | list[int] | None = None,
        condition: Any = None,
        source_uri: str | None = None,
        source_digest: str | None = None,
        caption: str | None = None,
        caption_tokens: Any = None,
        control_tokens: Any = None,
    ) -> None:
        """Add one sample. ``tokens`` is any integer array (numpy or torch) of any shape.

        ``shape`` defaults to the array's shape; pass it when ``tokens`` is flat.
        ``condition`` is a JSON value (a class label, a prompt, a dict); ``caption`` the text describing the sample
        and ``caption_tokens`` its ids under the store's text tokenizer; ``control_tokens`` are those of its
        control map (ControlAR) under the store's control tokenizer.
        """
        if self.done:
            raise StoreError("append after commit", where=self.bin_uri, fix="open a new ShardWriter for more samples")
        where = f"{self.bin_uri} sample {key!r}"
        if not isinstance(key, str) or not key:
            raise StoreError(f"sample key must be a non-empty string, got {key!r}", where=self.bin_uri)
        if key in self._keys:
            raise StoreError("duplicate sample key in this shard", where=where, fix="give every sample a unique key")
        if not modality:
            raise StoreError("sample has no modality", where=where, fix="pass modality='image' (or video, volume, ...)")
        arr = _as_array(tokens)
        if arr.dtype.kind not in "iub":
            raise StoreError(f"tokens must be integers, got dtype {arr.dtype}", where=where,
                             fix="pass the tokenizer's integer code indices")
        if arr.size == 0:
            raise StoreError("sample has no tokens", where=where, fix="drop empty samples before writing")
        sample_shape = tuple(int(d) for d in (arr.shape if shape is None else shape))
        if int(np.prod(sample_shape, dtype=np.int64)) != arr.size:
            raise StoreError(f"shape {sample_shape} does not hold {arr.size} tokens", where=where,
                             fix="pass the shape of the token grid, or omit it")
        flat = arr.reshape(-1)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= self.token_limit:
            pos = int(np.flatnonzero((flat < 0) | (flat >= self.token_limit))[0])
            bound = f"vocab_size {self.vocab_size}" if self.vocab_size is not None else f"dtype {self.dtype}"
            raise StoreError(f"token {int(flat[pos])} at position {pos} does not fit {self.dtype} "
                             f"({bound}: ids 0..{self.token_limit - 1})", where=where,
                             fix="check the tokenizer's codebook size and the vocab_size given to the writer")
        try:
            condition_json = None if condition is None else json.dumps(condition, sort_keys=True, default=_json_value)
        except TypeError as err:
            raise StoreError(f"condition is not JSON: {err}", where=where, fix="pass an int label, a string or a dict") from None
        data = flat.astype(self.np_dtype, copy=False).tobytes()
        self._spool.write(data)
        self._hasher.update(data)
        cols = self._columns
        cols["key"].append(key)
        cols["offset"].append(self.tokens)
        cols["length"].append(flat.size)
        cols["shape"].append(list(sample_shape))
        cols["modality"].append(modality)
        cols["condition"].append(condition_json)
        cols["source_uri"].append(source_uri)
        cols["source_digest"].append(source_digest)
        cols["caption"].append(caption)
        cols["caption_tokens"].append(None if caption_tokens is None else np.asarray(caption_tokens).tolist())
        cols["control_tokens"].append(None if control_tokens is None else np.asarray(control_tokens).reshape(-1).tolist())
        self._keys.add(key)
        self.samples += 1
        self.tokens += flat.size

    def commit(self) -> ShardInfo:
        """Publish the shard (tokens, then index, then sidecar) and return what the manifest needs."""
        if self.done:
            raise StoreError("shard committed twice", where=self.bin_uri)
        self._cleanup.detach()
        self._spool.flush()
        os.fsync(self._spool.fileno())
        self._spool.close()
        table = pa.table(self._columns, schema=INDEX_SCHEMA)
        sink = pa.BufferOutputStream()
        # zstd: offsets, lengths and repeated shapes/modalities shrink to a few bytes per sample
        with pa.ipc.new_file(sink, INDEX_SCHEMA, options=pa.ipc.IpcWriteOptions(compression="zstd")) as ipc:
            ipc.write_table(table)
        index_bytes = sink.getvalue().to_pybytes()
        if self._local_dir is not None:
            os.replace(self._spool_path, self.bin_uri)
        else:
            try:
                self._storage.put_file(self._spool_path, self.bin_uri)
            finally:
                os.remove(self._spool_path)
        self._storage.write_bytes(shard_uri(self.store_uri, index_name(self.name)), index_bytes)
        info = ShardInfo(
            name=self.name, samples=self.samples, tokens=self.tokens, bytes=self.bytes,
            checksum=self._hasher.hexdigest(), index_bytes=len(index_bytes), index_checksum=checksum(index_bytes),
            format_version=FORMAT_VERSION, dtype=self.dtype, checksum_algorithm=CHECKSUM_ALGORITHM,
        )
        self._storage.write_text(shard_uri(self.store_uri, info_name(self.name)), info.model_dump_json(indent=1))
        self.done = True
        self._columns = {}
        return info

    def abort(self) -> None:
        """Drop the spool; the store is left as it was."""
        if not self.done:
            self._cleanup()
            self.done = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.done:
            self.commit()


class StoreWriter:
    """Single-process writing that rolls shards by sample count and/or bytes.

    Shards are named ``<prefix><n:06d>``; give each input partition its own
    prefix to write one partition per task with deterministic names.
    :meth:`finish` commits the open shard and returns every :class:`ShardInfo`;
    :meth:`close` also writes the manifest.
    """

    def __init__(
        self,
        store_uri: str,
        *,
        vocab_size: int,
        samples_per_shard: int | None = 4096,
        bytes_per_shard: int | None = None,
        prefix: str = "",
        tokenizer: TokenizerRef | None = None,
        vocab: VocabLayout | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        if samples_per_shard is not None and samples_per_shard <= 0:
            raise StoreError(f"samples_per_shard must be positive, got {samples_per_shard}", where=store_uri)
        if bytes_per_shard is not None and bytes_per_shard <= 0:
            raise StoreError(f"bytes_per_shard must be positive, got {bytes_per_shard}", where=store_uri)
        self.store_uri = store_uri
        self.vocab_size = vocab_size
        self.samples_per_shard = samples_per_shard
        self.bytes_per_shard = bytes_per_shard
        self.prefix = prefix
        self.tokenizer = tokenizer
        self.vocab = vocab or VocabLayout(vocab_size=vocab_size)
        self.metadata = dict(metadata or {})
        self.shards: list[ShardInfo] = []
        self._open: ShardWriter | None = None
        self._itemsize = numpy_dtype(dtype_for_vocab(vocab_size)).itemsize

    def _roll(self) -> None:
        if self._open is not None:
            self.shards.append(self._open.commit())
            self._open = None

    def append(self, tokens: Any, **sample: Any) -> None:
        """Add one sample (same keywords as :meth:`ShardWriter.append`), starting a new shard when due."""
        open_ = self._open
        if open_ is not None and self.bytes_per_shard is not None and open_.samples > 0:
            size = int(np.size(_as_array(tokens))) * self._itemsize
            if open_.bytes + size > self.bytes_per_shard:
                self._roll()
        if self._open is None:
            name = f"{self.prefix}{len(self.shards):06d}"
            self._open = ShardWriter(self.store_uri, name, vocab_size=self.vocab_size)
        self._open.append(tokens, **sample)
        if self.samples_per_shard is not None and self._open.samples >= self.samples_per_shard:
            self._roll()

    def finish(self) -> list[ShardInfo]:
        self._roll()
        return list(self.shards)

    def close(self, metadata: dict[str, Any] | None = None) -> StoreManifest:
        infos = self.finish()
        return write_manifest(self.store_uri, infos, tokenizer=self.tokenizer, vocab=self.vocab,
                              metadata={**self.metadata, **(metadata or {})})

    def abort(self) -> None:
        if self._open is not None:
            self._open.abort()
            self._open = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def read_shard_info(store_uri: str, name: str) -> ShardInfo:
    """The sidecar a committed shard left: lets a driver build the manifest from shard names alone."""
    uri = shard_uri(store_uri, info_name(name))
    try:
        text = storage_for(uri).read_text(uri)
    except FileNotFoundError:
        raise StoreError(f"shard {name!r} has no sidecar: it was never committed", where=uri,
                         fix="rerun the writer for this shard") from None
    return ShardInfo.model_validate_json(text)


def write_manifest(
    store_uri: str,
    shard_infos: list[ShardInfo],
    *,
    vocab: VocabLayout | int,
    tokenizer: TokenizerRef | None = None,
    metadata: dict[str, Any] | None = None,
) -> StoreManifest:
    """Commit a store: check the shards agree and are in place, then write ``manifest.json`` atomically.

    Shard order is the order given (the store's sample order), so pass them
    sorted by input partition.
    """
    layout = vocab if isinstance(vocab, VocabLayout) else VocabLayout(vocab_size=int(vocab))
    dtype = dtype_for_vocab(layout.vocab_size)
    storage = storage_for(store_uri)
    names: set[str] = set()
    for info in shard_infos:
        where = shard_uri(store_uri, bin_name(info.name))
        if info.name in names:
            raise StoreError(f"shard {info.name!r} is listed twice", where=where, fix="pass each ShardInfo once")
        names.add(info.name)
        if info.format_version != FORMAT_VERSION or info.checksum_algorithm != CHECKSUM_ALGORITHM:
            raise StoreError(f"shard written with format {info.format_version}/{info.checksum_algorithm}, "
                             f"this writer uses {FORMAT_VERSION}/{CHECKSUM_ALGORITHM}", where=where,
                             fix="rewrite the shard with this arpipe version")
        if info.dtype != dtype:
            raise StoreError(f"shard dtype {info.dtype} differs from the store's {dtype} (vocab_size {layout.vocab_size})",
                             where=where, fix="write every shard with the same vocab_size")
    # every shard must be in place as its writer left it; on S3 that is one HEAD each, so ask in parallel
    expected = [(shard_uri(store_uri, name), size) for info in shard_infos
                for name, size in ((bin_name(info.name), info.bytes), (index_name(info.name), info.index_bytes))]
    with ThreadPoolExecutor(16 if is_s3(store_uri) else 1) as pool:
        sizes = list(pool.map(storage.size, [uri for uri, _ in expected]))
    for (uri, size), actual in zip(expected, sizes, strict=True):
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise StoreError(f"{uri.rsplit('/', 1)[-1]} is {found}, its writer recorded {size} bytes", where=uri,
                             fix="rerun the writer for this shard")
    entries = [info.entry() for info in shard_infos]
    totals = StoreTotals(
        shards=len(entries), samples=sum(e.samples for e in entries), tokens=sum(e.tokens for e in entries),
        bytes=sum(e.bytes for e in entries), index_bytes=sum(e.index_bytes for e in entries),
    )
    manifest = StoreManifest(
        format_version=FORMAT_VERSION, tokenizer=tokenizer, vocab=layout, dtype=dtype,
        checksum_algorithm=CHECKSUM_ALGORITHM, shards=entries, totals=totals,
        digest=store_digest(dtype=dtype, vocab=layout, tokenizer=tokenizer, shards=entries),
        metadata=dict(metadata or {}),
    )
    storage.write_text(shard_uri(store_uri, MANIFEST), manifest.model_dump_json(indent=1))
    return manifest
