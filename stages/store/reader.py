"""Reading token stores: random access, batched gathers, zero-copy local views, cached ranged S3 reads.

Opening reads only ``manifest.json`` (and, locally, stats each shard so a
truncated or missing file is named at once); each shard is loaded on first
touch by :class:`~stages.store.shard.ShardReader`. Local token files are
memory-mapped: a gather is one fancy-index copy per shard, a single sample is a
view. Remote token files are read in blocks through
:class:`~stages.store.remote.BlockCache`, fetched ahead along the planned order.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from arpipe.pipeline.storage import normalize, storage_for
from arpipe.schemas.store import StoreManifest

from .format import (
    FORMAT_VERSION,
    MANIFEST,
    StoreError,
    new_hasher,
    numpy_dtype,
    shard_uri,
    store_digest,
)
from .remote import BlockCache
from .shard import ShardReader, consecutive


def read_manifest(uri: str) -> StoreManifest:
    """The validated manifest of the store at ``uri``; refuses a newer format rather than misread it."""
    path = shard_uri(uri, MANIFEST)
    storage = storage_for(path)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise StoreError("no manifest.json: not a token store, or its writer never finished", where=uri,
                         fix="check the URI, or rerun the stage that writes this store") from None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise StoreError(f"manifest.json is not JSON ({err})", where=path, fix="rewrite the store") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise StoreError(f"manifest format version {version} is newer than this arpipe reads ({FORMAT_VERSION})",
                         where=path, fix="upgrade arpipe to read this store")
    try:
        manifest = StoreManifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise StoreError(f"invalid manifest at {loc or 'top level'}: {first['msg']}", where=path,
                         fix="rewrite the store with this arpipe version") from None
    # the digest covers vocabulary, dtype, tokenizer and every shard's checksum: a manifest edited by
    # hand (a vocabulary shrunk below the tokens it holds) is refused before anything trains on it
    if store_digest(dtype=manifest.dtype, vocab=manifest.vocab, tokenizer=manifest.tokenizer,
                    shards=manifest.shards) != manifest.digest:
        raise StoreError("manifest.json does not match its digest (edited by hand, or mixed from two stores)",
                         where=path, fix="rewrite the store: rerun the stage that wrote it")
    return manifest


@dataclass(frozen=True)
class Sample:
    """One sample with its tokens in their original shape and everything the writer recorded."""

    index: int
    key: str
    modality: str
    shape: tuple[int, ...]
    tokens: np.ndarray
    condition: Any
    source_uri: str | None
    source_digest: str | None
    shard: str
    caption: str | None = None
    caption_tokens: tuple[int, ...] | None = None
    control_tokens: tuple[int, ...] | None = None


@dataclass
class Batch:
    """Samples gathered in one copy: ``tokens`` concatenated, sample ``j`` at ``tokens[offsets[j]:offsets[j+1]]``."""

    indices: np.ndarray
    tokens: np.ndarray
    offsets: np.ndarray
    shapes: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.tokens[self.offsets[j]: self.offsets[j + 1]].reshape(self.shapes[j])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def stack(self) -> np.ndarray:
        """``(n, *shape)`` when every sample has the same shape (the common case for image tokens)."""
        if any(s != self.shapes[0] for s in self.shapes):
            raise ValueError(f"samples have different shapes ({sorted(set(self.shapes))}); use batch[j] or packing")
        return self.tokens.reshape((len(self), *(self.shapes[0] if self.shapes else ())))

    def torch(self):
        """The tokens as a tensor sharing this batch's memory (uint16/uint32; ``.long()`` for embeddings)."""
        import torch

        return torch.from_numpy(self.tokens)


class TokenStore:
    """A committed token store: ``len(store)``, ``store[i]``, ``store.gather(indices)``, ``store.torch(i)``.

    Safe to pickle (to DataLoader workers or Ray tasks): the copy reopens lazily.
    """

    def __init__(self, uri: str, manifest: StoreManifest, *, cache_bytes: int = 256 << 20,
                 block_bytes: int = 4 << 20, threads: int = 8, check_sizes: bool = True):
        self.uri = uri
        self.manifest = manifest
        self.storage = storage_for(uri)
        self.local = self.storage.local_path(uri) is not None
        self.np_dtype = numpy_dtype(manifest.dtype)
        if block_bytes % 4:
            raise StoreError(f"block_bytes must be a multiple of 4, got {block_bytes}", where=uri)
        self._options = {"cache_bytes": cache_bytes, "block_bytes": block_bytes, "threads": threads}
        self.cache = BlockCache(self.storage, block_bytes=block_bytes, capacity_bytes=cache_bytes, threads=threads)
        self.shard_sizes = np.array([s.samples for s in manifest.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        self._shards = [ShardReader(self, e, int(s)) for e, s in zip(manifest.shards, self._starts, strict=True)]
        self._ends = (self._starts + self.shard_sizes).tolist()
        self._samples = manifest.totals.samples
        self._lock = threading.Lock()
        if self.local and check_sizes:
            for shard in self._shards:
                self.check_size(shard.bin_uri, shard.entry.bytes, "tokens")
                self.check_size(shard.index_uri, shard.entry.index_bytes, "index")

    @classmethod
    def open(cls, uri: str, *, cache_bytes: int = 256 << 20, block_bytes: int = 4 << 20, threads: int = 8) -> TokenStore:
        """Open a committed store (local path or ``s3://``). S3 reads go through a block cache of ``cache_bytes``."""
        uri = normalize(uri)
        return cls(uri, read_manifest(uri), cache_bytes=cache_bytes, block_bytes=block_bytes, threads=threads)

    def __reduce__(self):
        return (_reopen, (self.uri, self.manifest.model_dump_json(), self._options))

    # -- facts from the manifest -------------------------------------------------------------
    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab.vocab_size

    @property
    def shard_names(self) -> list[str]:
        return [s.name for s in self.manifest.shards]

    @property
    def shard_starts(self) -> np.ndarray:
        """Global index of each shard's first sample."""
        return self._starts

    def __len__(self) -> int:
        return self.manifest.totals.samples

    def __repr__(self) -> str:
        t = self.manifest.totals
        return f"TokenStore({self.uri!r}, samples={t.samples}, shards={t.shards}, dtype={self.dtype})"

    # -- locating samples ----------------------------------------------------------------------
    def check_size(self, uri: str, expected: int, what: str) -> None:
        actual = self.storage.size(uri)
        name = uri.rsplit("/", 1)[-1]
        if actual is None:
            raise StoreError(f"{what} file {name} is missing", where=uri,
                             fix="re-copy the store or rerun the stage that wrote it")
        if actual != expected:
            state = "truncated" if actual < expected else "longer than recorded"
            raise StoreError(f"{what} file {name} is {state}: {actual} bytes, the manifest says {expected}",
                             where=uri, fix="re-copy the store or rerun the stage that wrote it")

    def _shard(self, s: int) -> ShardReader:
        shard = self._shards[s]
        if not shard.loaded:
            with self._lock:
                if not shard.loaded:
                    shard.load()
        return shard

    def _normalize(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise IndexError(f"sample {bad} out of range for {self.uri} ({n} samples)")
        return np.where(idx < 0, idx + n, idx)

    def _locate(self, i: int) -> tuple[ShardReader, int]:
        """(shard, row) of sample ``i``: the per-sample hot path, plain Python on plain ints."""
        n = self._samples
        if type(i) is not int:  # numpy or torch integers: converted as gather converts them
            i = int(self._normalize([i])[0])
        elif not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.uri} ({n} samples)")
        elif i < 0:
            i += n
        s = bisect.bisect_right(self._ends, i)
        shard = self._shards[s]
        if not shard.loaded:
            shard = self._shard(s)
        return shard, i - shard.start

    def _groups(self, idx: np.ndarray) -> list[tuple[ShardReader, np.ndarray, np.ndarray]]:
        """(shard, positions in idx, rows in shard) per shard touched."""
        sid = np.searchsorted(self._starts, idx, side="right") - 1
        if idx.size == 0:
            return []
        if sid[0] == sid.min() == sid.max():
            shard = self._shard(int(sid[0]))
            return [(shard, np.arange(idx.size), idx - shard.start)]
        order = np.argsort(sid, kind="stable")
        cuts = np.flatnonzero(np.diff(sid[order])) + 1
        groups = []
        for pos in np.split(order, cuts):
            shard = self._shard(int(sid[pos[0]]))
            groups.append((shard, pos, idx[pos] - shard.start))
        return groups

    # -- reading -------------------------------------------------------------------------------
    def tokens(self, i: int) -> np.ndarray:
        """Sample ``i``'s tokens in their shape: a view of the mapped file locally, a copy from S3."""
        shard, row = self._locate(i)
        return shard.sample_tokens(row)

    def torch(self, i: int):
        """Sample ``i``'s tokens as a tensor; zero-copy over the memory map for local stores."""
        import torch

        return torch.from_numpy(self.tokens(i))

    def __getitem__(self, i: int) -> Sample:
        shard, row = self._locate(i)
        c = shard.columns()
        tokens = shard.sample_tokens(row)
        # Filled in place: the frozen dataclass __init__ (one object.__setattr__ per field) would triple the cost
        # of a sample. Every field is set; tests compare all of them with the index read through Arrow.
        sample = object.__new__(Sample)
        sample.__dict__.update({
            "index": shard.start + row, "key": c.keys[row], "modality": c.modalities[row], "shape": tokens.shape,
            "tokens": tokens, "condition": None if (cond := c.conditions[row]) is None else json.loads(cond),
            "source_uri": c.source_uris[row],
            "source_digest": c.source_digests[row], "shard": shard.entry.name, "caption": c.captions[row],
            "caption_tokens": c.caption_tokens[row], "control_tokens": c.control_tokens[row],
        })
        return sample

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def gather(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """The tokens of many samples in one buffer, in the order asked for."""
        fast = self._gather_one_uniform_shard(indices)
        if fast is not None:
            return fast
        idx = self._normalize(indices)
        groups = self._groups(idx)
        lengths = np.empty(idx.size, np.int64)
        for shard, pos, rows in groups:
            lengths[pos] = shard.lengths[rows]
        offsets = np.zeros(idx.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), self.np_dtype)
        uniform = idx.size > 0 and int(lengths.min()) == int(lengths.max())
        rows2d = tokens.reshape(idx.size, -1) if uniform and lengths[0] > 0 else None
        for shard, pos, rows in groups:
            if consecutive(rows) and consecutive(pos):
                # a sequential run: one copy (locally a memcpy from the map, remotely one ranged read)
                tokens[offsets[pos[0]]: offsets[pos[-1] + 1]] = shard.token_span(int(rows[0]), int(rows[-1]) + 1)
            elif rows2d is not None and shard.rows is not None:
                rows2d[pos] = shard.rows[rows]
            else:
                shard.copy_rows(rows, offsets[pos], tokens)
        common = {g[0].uniform_shape for g in groups}
        if len(common) == 1 and None not in common:
            shapes = [common.pop()] * idx.size
        else:
            shapes = [()] * idx.size
            for shard, pos, rows in groups:
                for p, r in zip(pos.tolist(), rows.tolist(), strict=True):
                    shapes[p] = shard.shape(r)
        return Batch(indices=idx, tokens=tokens, offsets=offsets, shapes=shapes)

    def _gather_one_uniform_shard(self, indices: Sequence[int] | np.ndarray) -> Batch | None:
        """The training hot path: a shuffled batch from one local shard of equal-length samples.

        A windowed shuffle puts most batches inside one shard; doing this case in a
        handful of numpy calls keeps per-batch overhead small next to the copy itself.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = idx.size
        if n < 2 or not self.local:
            return None
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= len(self):
            return None
        s = bisect.bisect_right(self._ends, lo)
        if hi >= self._ends[s]:
            return None
        shard = self._shard(s)
        if shard.rows is None or (hi - lo == n - 1 and consecutive(idx)):
            return None
        length = shard.uniform_length
        tokens = shard.rows[idx - shard.start if shard.start else idx]  # fancy indexing beats np.take(out=) here
        offsets = np.arange(0, (n + 1) * length, length, dtype=np.int64)
        return Batch(indices=idx, tokens=tokens.reshape(-1), offsets=offsets, shapes=[shard.uniform_shape] * n)

    def lengths(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Token count per sample (all samples when ``indices`` is None); reads the indexes it needs."""
        idx = np.arange(len(self)) if indices is None else self._normalize(indices)
        out = np.empty(idx.size, np.int64)
        for shard, pos, rows in self._groups(idx):
            out[pos] = shard.lengths[rows]
        return out

    def conditions(self, indices: Sequence[int] | np.ndarray) -> list:
        """The decoded condition (label) of each sample, None where unconditional."""
        idx = self._normalize(indices)
        out: list = [None] * idx.size
        for shard, pos, rows in self._groups(idx):
            conds = shard.conditions()
            for p, r in zip(pos.tolist(), rows.tolist(), strict=True):
                out[p] = conds[r]
        return out

    def condition_lengths(self, column: str = "caption_tokens") -> np.ndarray:
        """Tokens per sample of a condition column, ``caption_tokens`` or ``control_tokens`` (0 where a sample
        has none, or in stores written before the column)."""
        import pyarrow.compute as pc

        out = np.zeros(len(self), np.int64)
        for s in range(len(self.manifest.shards)):
            shard = self._shard(s)
            if column in shard.table.column_names:
                counts = pc.fill_null(pc.list_value_length(shard.table.column(column)), 0)
                out[shard.start:shard.start + len(counts)] = counts.to_numpy()
        return out

    def prefetch(self, indices: Sequence[int] | np.ndarray) -> None:
        """Hint: these samples come next. Remote stores start fetching their blocks; local ones need nothing."""
        if self.local:
            return
        for shard, _pos, rows in self._groups(self._normalize(indices)):
            self.cache.prefetch(shard.bin_uri, shard.blocks(rows), shard.entry.bytes)

    def readahead_samples(self) -> int:
        """How far ahead to fetch: half the block cache, in samples of average size.

        A windowed shuffle needs a whole window's blocks for its first batch, so
        read-ahead must reach into the next window well before the current one ends.
        """
        t = self.manifest.totals
        per_sample = max(1, t.bytes // max(1, t.samples))
        return max(1, int(self.cache.capacity_blocks * self.cache.block_bytes // 2 // per_sample))

    def iter_batches(self, order: Sequence[int] | np.ndarray, batch_size: int, *,
                     readahead: int | None = None) -> Iterator[Batch]:
        """Gather ``order`` in batches; remote stores prefetch ``readahead`` samples ahead (default: half the cache)."""
        order = np.asarray(order, dtype=np.int64)
        reach = self.readahead_samples() if readahead is None else readahead
        ahead = 0
        for start in range(0, len(order), batch_size):
            if not self.local:
                horizon = min(len(order), start + batch_size + reach)
                if ahead < horizon and (ahead <= start + reach // 2 or horizon == len(order)):
                    self.prefetch(order[max(ahead, start): horizon])  # in large steps: few, cheap calls
                    ahead = horizon
            yield self.gather(order[start: start + batch_size])

    # -- integrity -----------------------------------------------------------------------------
    def verify(self) -> list[StoreError]:
        """Hash every shard and index against the manifest; one error per bad shard (empty when sound)."""
        problems: list[StoreError] = []
        m = self.manifest
        digest = store_digest(dtype=m.dtype, vocab=m.vocab, tokenizer=m.tokenizer, shards=m.shards)
        if digest != m.digest:
            problems.append(StoreError("store digest does not match its shards (manifest edited by hand?)",
                                       where=shard_uri(self.uri, MANIFEST), fix="rewrite the manifest"))
        for shard in self._shards:
            try:
                self.check_size(shard.bin_uri, shard.entry.bytes, "tokens")
                hasher = new_hasher()
                with self.storage.open_read(shard.bin_uri) as stream:
                    while chunk := stream.read(8 << 20):
                        hasher.update(chunk)
                if hasher.hexdigest() != shard.entry.checksum:
                    raise StoreError(f"shard {shard.entry.name!r}: token checksum mismatch (data corrupted)",
                                     where=shard.bin_uri, fix="re-copy the store or rerun the stage that wrote it")
                if not shard.loaded:
                    shard.load()
            except StoreError as err:
                problems.append(err)
        return problems

    def close(self) -> None:
        self.cache.close()


def _reopen(uri: str, manifest_json: str, options: dict) -> TokenStore:
    # A worker's copy trusts the manifest its parent validated; sizes are checked again lazily.
    return TokenStore(uri, StoreManifest.model_validate_json(manifest_json), check_sizes=False, **options)

