"""Several token stores read as one, for weighted training mixtures.

Sample ids are concatenated: store ``c``'s sample ``j`` is ``offsets[c] + j``.
The interleave itself (who comes next) is :class:`~stages.store.order.MixtureOrder`;
this class only routes reads, so a sampler can treat a mixture like a store.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .format import StoreError
from .order import MixtureOrder, ShuffledOrder
from .reader import Batch, Sample, TokenStore


class StoreMixture:
    """Stores with weights; ``samples_per_epoch`` sets how many positions make one mixture epoch."""

    def __init__(self, stores: Sequence[TokenStore], weights: Sequence[float], *, samples_per_epoch: int | None = None):
        if not stores:
            raise StoreError("a mixture needs at least one store", fix="list stores with their weights")
        if len(stores) != len(weights):
            raise StoreError(f"{len(stores)} stores but {len(weights)} weights", fix="give one weight per store")
        dtypes = {s.dtype for s in stores}
        if len(dtypes) > 1:
            raise StoreError(f"mixed token dtypes {sorted(dtypes)}", where=", ".join(s.uri for s in stores),
                             fix="mix stores of the same tokenizer (vocabulary)")
        self.stores = list(stores)
        self.weights = [float(w) for w in weights]
        self.samples_per_epoch = samples_per_epoch
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in stores])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def digest(self) -> str:
        return "+".join(s.digest for s in self.stores)

    def order(self, *, seed: int = 0, window: int = 65536, shuffle: bool = True) -> MixtureOrder:
        comps = [ShuffledOrder(s.shard_sizes, s.digest, seed=seed, window=window, shuffle=shuffle) for s in self.stores]
        return MixtureOrder(comps, self.weights, samples_per_epoch=self.samples_per_epoch)

    def _split(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"mixture sample id out of range 0..{len(self) - 1}")
        comp = np.searchsorted(self.offsets, idx, side="right") - 1
        return idx, [(c, np.flatnonzero(comp == c)) for c in np.unique(comp).tolist()]

    def store_of(self, i: int) -> tuple[int, int]:
        """(store number, index in that store) of mixture sample ``i``."""
        c = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return c, int(i - self.offsets[c])

    def __getitem__(self, i: int) -> Sample:
        c, j = self.store_of(i)
        return self.stores[c][j]

    def gather(self, indices: Sequence[int] | np.ndarray) -> Batch:
        idx, parts = self._split(indices)
        if len(parts) == 1:
            c, _ = parts[0]
            batch = self.stores[c].gather(idx - self.offsets[c])
            batch.indices = idx
            return batch
        pieces: list[tuple[np.ndarray, Batch]] = []
        lengths = np.empty(idx.size, np.int64)
        shapes: list[tuple[int, ...]] = [()] * idx.size
        for c, pos in parts:
            b = self.stores[c].gather(idx[pos] - self.offsets[c])
            lengths[pos] = b.lengths
            for p, shape in zip(pos.tolist(), b.shapes, strict=True):
                shapes[p] = shape
            pieces.append((pos, b))
        offsets = np.zeros(idx.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), self.stores[0].np_dtype)
        for pos, b in pieces:
            for j, p in enumerate(pos.tolist()):
                tokens[offsets[p]: offsets[p + 1]] = b.tokens[b.offsets[j]: b.offsets[j + 1]]
        return Batch(indices=idx, tokens=tokens, offsets=offsets, shapes=shapes)

    def lengths(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        if indices is None:
            return np.concatenate([s.lengths() for s in self.stores])
        idx, parts = self._split(indices)
        out = np.empty(idx.size, np.int64)
        for c, pos in parts:
            out[pos] = self.stores[c].lengths(idx[pos] - self.offsets[c])
        return out

    def conditions(self, indices: Sequence[int] | np.ndarray) -> list:
        idx, parts = self._split(indices)
        out: list = [None] * idx.size
        for c, pos in parts:
            for p, cond in zip(pos.tolist(), self.stores[c].conditions(idx[pos] - self.offsets[c]), strict=True):
                out[p] = cond
        return out

    def prefetch(self, indices: Sequence[int] | np.ndarray) -> None:
        idx, parts = self._split(indices)
        for c, pos in parts:
            self.stores[c].prefetch(idx[pos] - self.offsets[c])
