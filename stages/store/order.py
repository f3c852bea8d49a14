"""Global sample orders: pure functions of (seed, epoch, store digest), computed lazily by window.

:class:`ShuffledOrder` shuffles the shard order, then shuffles samples within
fixed windows of the concatenated sequence. Windows keep reads local (a batch
touches a few shards and, remotely, a few cached blocks) while every epoch still
visits the data in a new order. Any position's sample is computable from its
window alone, so resuming at position ``p`` costs one window, not ``p`` steps.

:class:`MixtureOrder` interleaves several orders by smooth weighted round robin
on integer weights: over every period of ``sum(weights)`` positions each
component appears exactly ``weight`` times, so proportions are exact at any
resume point and the interleave state is a function of the position alone.

:class:`LengthGroupedOrder` sorts each megabatch of either by sample length
(``group_by_length``), so batches hold documents of similar length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from arpipe.pipeline.digest import digest_json

from .format import StoreError

_MASK64 = (1 << 64) - 1


def _digest_words(digest: str) -> list[int]:
    h = hashlib.sha256(digest.encode()).digest()
    return [int.from_bytes(h[i: i + 8], "little") for i in range(0, 32, 8)]


def block_slice(block: Callable[[int], np.ndarray], width: int, size: int, start: int, stop: int) -> np.ndarray:
    """Positions ``[start, stop)`` of an order of ``size`` positions made in blocks of ``width`` (``block(b)``:
    block ``b``'s ids): only the blocks the range touches are computed."""
    start, stop = max(0, start), min(size, stop)
    if stop <= start:
        return np.empty(0, np.int64)
    parts = []
    for b in range(start // width, (stop - 1) // width + 1):
        base = b * width
        parts.append(block(b)[max(start - base, 0): stop - base])
    return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)


class ShuffledOrder:
    """The order of one store's samples in each epoch."""

    def __init__(self, shard_sizes: np.ndarray | list[int], digest: str, *, seed: int = 0, window: int = 65536,
                 shuffle: bool = True):
        if window <= 0:
            raise StoreError(f"shuffle window must be positive, got {window}", fix="use e.g. window=16384")
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        self.size = int(self.shard_sizes.sum())
        self.store_digest = digest
        self.seed, self.window, self.shuffle = int(seed), int(window), bool(shuffle)
        self._words = _digest_words(digest)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    @property
    def digest(self) -> str:
        """Identity of this order's definition: the same digest gives the same sequence, epoch by epoch."""
        spec = {"store": self.store_digest, "seed": self.seed, "window": self.window, "shuffle": self.shuffle}
        return digest_json(spec)

    def _rng(self, epoch: int, *tag: int) -> np.random.Generator:
        entropy = [self.seed & _MASK64, epoch, *self._words, *tag]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order for ``epoch`` and where each shard begins in the concatenated sequence."""
        if epoch not in self._layouts:
            n = len(self.shard_sizes)
            perm = self._rng(epoch, 0).permutation(n) if self.shuffle else np.arange(n)
            sizes = self.shard_sizes[perm]
            if len(self._layouts) >= 2:
                self._layouts.clear()
            self._layouts[epoch] = perm, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return self._layouts[epoch]

    def _window(self, epoch: int, w: int) -> np.ndarray:
        ids = self._windows.get((epoch, w))
        if ids is None:
            if len(self._windows) >= 8:
                self._windows.pop(next(iter(self._windows)))
            ids = self._windows[(epoch, w)] = self._compute_window(epoch, w)
        return ids

    def _compute_window(self, epoch: int, w: int) -> np.ndarray:
        perm, cum = self._layout(epoch)
        lo, hi = w * self.window, min((w + 1) * self.window, self.size)
        first = int(np.searchsorted(cum, lo, side="right")) - 1
        last = int(np.searchsorted(cum, hi - 1, side="right")) - 1
        pieces = []
        for k in range(first, last + 1):  # the few shards this window spans, as id ranges
            base = int(self.starts[perm[k]]) - int(cum[k])
            pieces.append(np.arange(base + max(lo, int(cum[k])), base + min(hi, int(cum[k + 1])), dtype=np.int64))
        ids = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if self.shuffle:
            self._rng(epoch, 1, w).shuffle(ids)
        ids.setflags(write=False)
        return ids

    def slice(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample ids at positions ``[start, stop)`` of ``epoch``'s order."""
        return block_slice(lambda w: self._window(epoch, w), self.window, self.size, start, stop)

    def epoch(self, epoch: int) -> np.ndarray:
        return self.slice(epoch, 0, self.size)


def integer_weights(weights: list[float]) -> list[int]:
    """Smallest integers in the given proportions (weights read to 3 significant decimals)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise StoreError(f"mixture weights must be non-negative with a positive sum, got {weights}",
                         fix="e.g. weights: [0.7, 0.3]")
    fracs = [Fraction(w).limit_denominator(1000) for w in weights]
    denom = 1
    for f in fracs:
        denom = denom * f.denominator // np.gcd(denom, f.denominator)
    ints = [int(f * denom) for f in fracs]
    g = 0
    for i in ints:
        g = int(np.gcd(g, i))
    ints = [i // g for i in ints]
    if sum(ints) > 1_000_000:
        raise StoreError(f"mixture weights {weights} need a period of {sum(ints)} samples",
                         fix="use simpler ratios such as [0.7, 0.3] or [2, 1, 1]")
    return ints


def smooth_round_robin(weights: list[int]) -> np.ndarray:
    """One period of smooth weighted round robin: component per position, ties to the lower index."""
    total = sum(weights)
    current = [0] * len(weights)
    out = np.empty(total, np.int64)
    for t in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        pick = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[pick] -= total
        out[t] = pick
    return out


class MixtureOrder:
    """Positions of an endless interleave of component orders; an epoch is ``samples_per_epoch`` positions.

    Component ``c``'s sample ``j`` has global id ``offsets[c] + j`` (the ids of a
    :class:`~stages.store.mixture.StoreMixture`). A component that runs out
    continues with its own next epoch.
    """

    def __init__(self, components: list[ShuffledOrder], weights: list[float], *, samples_per_epoch: int | None = None):
        if len(components) != len(weights):
            raise StoreError(f"{len(components)} stores but {len(weights)} weights", fix="give one weight per store")
        self.components = components
        self.weights = integer_weights(weights)
        for comp, w in zip(components, self.weights, strict=True):
            if w > 0 and len(comp) == 0:
                raise StoreError("a mixture component with positive weight is empty", where=comp.store_digest)
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in components])[:-1]]).astype(np.int64)
        self.size = int(samples_per_epoch if samples_per_epoch is not None else sum(len(c) for c in components))
        if self.size <= 0:
            raise StoreError(f"samples_per_epoch must be positive, got {self.size}")
        self.period = smooth_round_robin(self.weights)
        # rank of each period position among earlier positions of the same component
        self.rank_in_period = np.empty(len(self.period), np.int64)
        seen = [0] * len(self.weights)
        for t, c in enumerate(self.period.tolist()):
            self.rank_in_period[t] = seen[c]
            seen[c] += 1

    def __len__(self) -> int:
        return self.size

    @property
    def digest(self) -> str:
        spec = {"components": [c.digest for c in self.components], "weights": self.weights, "epoch": self.size}
        return digest_json(spec)

    def cursors(self, position: int) -> list[int]:
        """How many samples each component has given before global ``position``: the interleave's state."""
        full, rest = divmod(int(position), len(self.period))
        counts = np.bincount(self.period[:rest], minlength=len(self.weights))
        return [full * w + int(c) for w, c in zip(self.weights, counts, strict=True)]

    def slice(self, epoch: int, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(self.size, stop)
        if stop <= start:
            return np.empty(0, np.int64)
        pos = np.arange(epoch * self.size + start, epoch * self.size + stop, dtype=np.int64)
        phase = pos % len(self.period)
        comp = self.period[phase]
        cursor = (pos // len(self.period)) * np.asarray(self.weights, np.int64)[comp] + self.rank_in_period[phase]
        out = np.empty(len(pos), np.int64)
        for c, order in enumerate(self.components):
            mask = comp == c
            if not mask.any():
                continue
            lo, hi = int(cursor[mask][0]), int(cursor[mask][-1]) + 1  # consecutive by construction
            n = len(order)
            parts = [order.slice(e, max(lo, e * n) - e * n, min(hi, (e + 1) * n) - e * n)
                     for e in range(lo // n, (hi - 1) // n + 1)]
            out[mask] = self.offsets[c] + np.concatenate(parts)
        return out

    def epoch(self, epoch: int) -> np.ndarray:
        return self.slice(epoch, 0, self.size)


#: global batches per megabatch: Hugging Face's ``megabatch_mult`` (``trainer_pt_utils.get_length_grouped_indices``)
MEGABATCH_BATCHES = 50


def megabatch_size(samples: int, global_batch: int) -> int:
    """Hugging Face's megabatch: 50 global batches, fewer on small data so an epoch keeps at least 4 of them.

    A megabatch as large as the epoch would sort the whole epoch by length, and
    every epoch would then run from its longest documents to its shortest.
    """
    return global_batch * max(1, min(MEGABATCH_BATCHES, samples // (4 * global_batch)))


class LengthGroupedOrder:
    """A base order with each megabatch sorted by length, longest first (Hugging Face's ``group_by_length``).

    Epoch ``e`` is ``base.epoch(e)`` cut into consecutive runs of ``megabatch``
    positions, each sorted by ``lengths`` descending; the sort is stable, so
    equal lengths keep the base order. The sampler deals consecutive positions
    to a step, so a micro-batch holds documents of similar length and pads only
    to its longest. It stays a pure function of (seed, epoch, digest, lengths):
    a position's sample needs only its own megabatch, so a sampler resumes at
    ``{epoch, samples_consumed}`` exactly. Hugging Face also moves the longest
    document of the epoch to its first batch (to run out of memory early); that
    would tie the first megabatch to every other one, and a row is never longer
    than ``seq_len`` anyway, so it is left out.
    """

    def __init__(self, base: ShuffledOrder | MixtureOrder, lengths: np.ndarray | list[int], megabatch: int):
        if megabatch <= 0:
            raise StoreError(f"megabatch must be positive, got {megabatch}", fix="use e.g. megabatch_size(...)")
        self.base, self.megabatch = base, int(megabatch)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.size = len(base)
        self._digest = digest_json({"base": base.digest, "megabatch": self.megabatch,
                                    "lengths": hashlib.sha256(self.lengths.tobytes()).hexdigest()})
        self._megabatches: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    @property
    def digest(self) -> str:
        """The base order's identity, the megabatch size and the lengths: what decides the sequence."""
        return self._digest

    def _sorted(self, epoch: int, m: int) -> np.ndarray:
        ids = self._megabatches.get((epoch, m))
        if ids is None:
            if len(self._megabatches) >= 4:
                self._megabatches.pop(next(iter(self._megabatches)))
            ids = self.base.slice(epoch, m * self.megabatch, (m + 1) * self.megabatch)
            ids = ids[np.argsort(-self.lengths[ids], kind="stable")]
            ids.setflags(write=False)
            self._megabatches[(epoch, m)] = ids
        return ids

    def slice(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample ids at positions ``[start, stop)`` of ``epoch``'s order; sorts only the megabatches touched."""
        return block_slice(lambda m: self._sorted(epoch, m), self.megabatch, self.size, start, stop)

    def epoch(self, epoch: int) -> np.ndarray:
        return self.slice(epoch, 0, self.size)
