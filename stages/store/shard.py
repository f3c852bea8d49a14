"""One shard of an open store: its index, checked against the manifest, and its token bytes.

Loaded on first touch. Locally the token file is memory-mapped (copy-on-write,
so torch can take zero-copy views without ever writing the file); remotely
tokens are copied out of cached blocks, vectorised per block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arpipe.schemas.store import ShardEntry

from .format import StoreError, bin_name, checksum, index_name, shard_uri

if TYPE_CHECKING:
    from .reader import TokenStore


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the ranges ``[starts[i], starts[i] + lengths[i])`` laid back to back."""
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))


def _rows_at_any_offset(flat: np.ndarray, length: int) -> np.ndarray:
    """A ``(n - length + 1, length)`` view whose row ``i`` is ``flat[i:i + length]`` (no copy)."""
    if flat.size < length:
        return flat[:0].reshape(0, length)
    step = flat.strides[0]
    return np.lib.stride_tricks.as_strided(flat, shape=(flat.size - length + 1, length), strides=(step, step),
                                           writeable=flat.flags.writeable)


def consecutive(a: np.ndarray) -> bool:
    """True when ``a`` counts up by one: such a run is copied as one span."""
    return len(a) > 1 and int(a[-1]) - int(a[0]) == len(a) - 1 and bool((np.diff(a) == 1).all())


@dataclass(frozen=True)
class Columns:
    """A shard's per-sample metadata as Python lists, decoded once: ``store[i]`` then reads no Arrow."""

    keys: list[str]
    modalities: list[str]
    conditions: list[str | None]   # as stored (JSON): each read parses its own, so no two reads share an object
    source_uris: list[str | None]
    source_digests: list[str | None]
    captions: list[str | None]
    caption_tokens: list[tuple[int, ...] | None]
    control_tokens: list[tuple[int, ...] | None]


def _shared(values: list) -> list:
    """``values`` with equal items as one object: a column of a few distinct names costs a pointer a row."""
    seen: dict = {}
    return [seen.setdefault(v, v) for v in values]


class ShardReader:
    """One shard's index and token bytes, loaded on first touch."""

    def __init__(self, store: TokenStore, entry: ShardEntry, start: int):
        self.store, self.entry, self.start = store, entry, start
        self.bin_uri = shard_uri(store.uri, bin_name(entry.name))
        self.index_uri = shard_uri(store.uri, index_name(entry.name))
        self.loaded = False
        self.rows: np.ndarray | None = None  # (samples, length) view of a local uniform-length shard
        self._columns: Columns | None = None
        self._shapes: list[tuple[int, ...]] | None = None
        self._bounds: list[int] | None = None

    def load(self) -> None:
        storage, entry = self.store.storage, self.entry
        self.store.check_size(self.bin_uri, entry.bytes, "tokens")
        try:
            data = storage.read_bytes(self.index_uri)
        except FileNotFoundError:
            raise StoreError(f"shard {entry.name!r}: index {index_name(entry.name)} is missing", where=self.index_uri,
                             fix="re-copy the store or rerun the stage that wrote it") from None
        if len(data) != entry.index_bytes or checksum(data) != entry.index_checksum:
            raise StoreError(f"shard {entry.name!r}: index does not match the manifest "
                             f"({len(data)} bytes, manifest says {entry.index_bytes}; checksum differs)",
                             where=self.index_uri, fix="re-copy the store or rerun the stage that wrote it")
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        offsets = table.column("offset").to_numpy().astype(np.int64, copy=False)
        lengths = table.column("length").to_numpy().astype(np.int64, copy=False)
        expect = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        if table.num_rows != entry.samples or int(lengths.sum()) != entry.tokens or not np.array_equal(offsets, expect):
            raise StoreError(f"shard {entry.name!r}: index lists {table.num_rows} samples / {int(lengths.sum())} tokens, "
                             f"manifest says {entry.samples} / {entry.tokens}", where=self.index_uri,
                             fix="rewrite the shard")
        self.table, self.offsets, self.lengths = table, offsets, lengths
        self.uniform_length = int(lengths[0]) if len(lengths) and (lengths == lengths[0]).all() else None
        self.uniform_shape = self._uniform_shape(table)
        self._conditions: list | None = None
        dtype = self.store.np_dtype
        if self.store.local:
            if entry.tokens == 0:
                self.array = np.empty(0, dtype)
            else:
                # copy-on-write: torch gets a writable view, the file is never modified
                mapped = np.memmap(self.bin_uri, dtype=dtype, mode="c", shape=(entry.tokens,))
                self.array = mapped.view(np.ndarray)  # plain ndarray: indexing skips memmap's Python layer
            self.rows = self.array.reshape(-1, self.uniform_length) if self.uniform_length else None
        if self.rows is not None and self.uniform_shape:  # (a 0-d shape would index to a scalar, not an array)
            # every sample one view of a (samples, *shape) array: a single sample costs one index operation
            self.sample_tokens = self.array.reshape(entry.samples, *self.uniform_shape).__getitem__
        else:
            self.sample_tokens = self._sample_tokens
        self.loaded = True

    @staticmethod
    def _uniform_shape(table: pa.Table) -> tuple[int, ...] | None:
        shapes = table.column("shape").combine_chunks()
        if len(shapes) == 0:
            return None
        ndims = pc.list_value_length(shapes).to_numpy()
        if not (ndims == ndims[0]).all():
            return None
        dims = pc.list_flatten(shapes).to_numpy().reshape(len(shapes), int(ndims[0]))
        return tuple(int(d) for d in dims[0]) if (dims == dims[0]).all() else None

    def shape(self, row: int) -> tuple[int, ...]:
        if self.uniform_shape is not None:
            return self.uniform_shape
        if self._shapes is None:
            self._shapes = [tuple(s) for s in self.table.column("shape").to_pylist()]
        return self._shapes[row]

    def conditions(self) -> list:
        if self._conditions is None:
            raw = self.table.column("condition").to_pylist()
            self._conditions = [None if c is None else json.loads(c) for c in raw]
        return self._conditions

    def columns(self) -> Columns:
        """The metadata of every sample, decoded on first use (stores before captions read None there)."""
        if self._columns is None:
            table, n = self.table, self.table.num_rows

            def column(name: str) -> list:
                return table.column(name).to_pylist() if name in table.column_names else [None] * n

            def id_lists(name: str) -> list:
                return [None if v is None else tuple(v) for v in column(name)]

            self._columns = Columns(
                keys=column("key"), modalities=_shared(column("modality")), conditions=column("condition"),
                source_uris=column("source_uri"), source_digests=column("source_digest"), captions=column("caption"),
                caption_tokens=id_lists("caption_tokens"), control_tokens=id_lists("control_tokens"))
        return self._columns

    def _sample_tokens(self, row: int) -> np.ndarray:
        """Row ``row``'s tokens in its shape, where samples differ in shape (or the shard is remote)."""
        if not self.store.local:
            return self.token_range(row).reshape(self.shape(row))
        if self._bounds is None:
            self._bounds = [*self.offsets.tolist(), self.entry.tokens]
        return self.array[self._bounds[row]: self._bounds[row + 1]].reshape(self.shape(row))

    def token_range(self, row: int) -> np.ndarray:
        return self.token_span(row, row + 1)

    def token_span(self, first: int, stop: int) -> np.ndarray:
        """Tokens of rows ``first..stop-1``, which lie back to back in the file."""
        lo = int(self.offsets[first])
        hi = int(self.offsets[stop - 1] + self.lengths[stop - 1])
        if self.store.local:
            return self.array[lo:hi]
        item = self.store.np_dtype.itemsize
        data = self.store.cache.read(self.bin_uri, lo * item, (hi - lo) * item, self.entry.bytes)
        return np.frombuffer(data, dtype=self.store.np_dtype)

    def copy_rows(self, rows: np.ndarray, dest: np.ndarray, tokens: np.ndarray) -> None:
        """Copy each row's tokens to ``tokens[dest[i]:]``, vectorised (per cached block when remote)."""
        lens = self.lengths[rows]
        starts = self.offsets[rows]
        if self.store.local:
            tokens[_ranges(dest, lens)] = self.array[_ranges(starts, lens)]
            return
        per_block = self.store.cache.block_bytes // self.store.np_dtype.itemsize
        first = starts // per_block
        inside = first == (starts + lens - 1) // per_block
        for j in np.flatnonzero(~inside).tolist():  # the few samples that straddle two blocks
            tokens[dest[j]: dest[j] + lens[j]] = self.token_range(int(rows[j]))
        order = np.flatnonzero(inside)
        if order.size == 0:
            return
        order = order[np.argsort(first[order], kind="stable")]
        blocks, cuts = np.unique(first[order], return_index=True)
        length = self.uniform_length
        if length:  # every sample a row of `length` tokens starting at any token: whole-row copies
            out_rows = _rows_at_any_offset(tokens, length)
        for block, sel in zip(blocks.tolist(), np.split(order, cuts[1:]), strict=True):
            data = np.frombuffer(self.store.cache.get(self.bin_uri, block, self.entry.bytes), self.store.np_dtype)
            local = starts[sel] - block * per_block
            if length:
                out_rows[dest[sel]] = _rows_at_any_offset(data, length)[local]
            else:
                tokens[_ranges(dest[sel], lens[sel])] = data[_ranges(local, lens[sel])]

    def blocks(self, rows: np.ndarray) -> np.ndarray:
        item, block = self.store.np_dtype.itemsize, self.store.cache.block_bytes
        first = self.offsets[rows] * item // block
        last = ((self.offsets[rows] + self.lengths[rows]) * item - 1) // block
        spans = [first] + [first + k for k in range(1, int((last - first).max(initial=0)) + 1)]
        blocks = np.unique(np.concatenate(spans))
        return blocks[blocks <= (self.entry.bytes - 1) // block]
