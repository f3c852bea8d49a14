"""A distributed sampler whose position is two numbers: ``{epoch, samples_consumed}``.

The global order of an epoch is a pure function of (seed, epoch, store digest)
(:mod:`stages.store.order`). The order is cut into units — single samples, or
with ``seq_len`` the greedy sequences of :func:`~stages.store.packing.plan_sequences`
— and unit ``j`` (counted from the resume point) goes to rank ``j % world_size``.
So every training step, whatever the world size, consumes one contiguous run
of the global order, and the state after a step is where that run ends. A job
resumed with a different world size but the same global batch continues with
exactly the samples not yet seen. Nothing depends on DataLoader workers: the
order is fixed before any worker sees it.

The end of an epoch rarely divides evenly among ranks; the ``tail`` policy
says what happens and the plan records it: ``drop`` leaves the last units out
(:meth:`DistributedSampler.dropped_ids`), ``pad`` repeats units from the start
of the epoch, ``wrap`` borrows units from the next epoch, which then starts
after them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .format import StoreError
from .mixture import StoreMixture
from .order import LengthGroupedOrder, MixtureOrder, ShuffledOrder
from .packing import plan_sequences

TailPolicy = Literal["drop", "pad", "wrap"]
Order = ShuffledOrder | MixtureOrder | LengthGroupedOrder


@dataclass(frozen=True)
class EpochPlan:
    """What this epoch holds for every rank from the resume point on."""

    epoch: int
    start: int       # samples of this epoch consumed before the plan
    units: int       # units from ``start`` to the end of the epoch
    per_rank: int    # units each rank yields
    dropped: int     # units left out (tail=drop)
    padded: int      # units repeated from the epoch start (tail=pad)
    borrowed: int    # units taken from the next epoch (tail=wrap)


def order_for(source: Any, *, seed: int = 0, window: int = 65536, shuffle: bool = True) -> Order:
    """The epoch order of a store, a :class:`StoreMixture`, or an order passed through as is."""
    if isinstance(source, (ShuffledOrder, MixtureOrder, LengthGroupedOrder)):
        return source
    if isinstance(source, StoreMixture):
        return source.order(seed=seed, window=window, shuffle=shuffle)
    return ShuffledOrder(source.shard_sizes, source.digest, seed=seed, window=window, shuffle=shuffle)


class DistributedSampler:
    """Yields this rank's sample ids (or, with ``seq_len``, lists of ids per packed sequence).

    Use it as a DataLoader ``sampler`` (plain ids) or iterate it directly. After
    a full pass it moves itself to the next epoch; ``set_epoch(e)`` with the
    current epoch keeps a resumed position, so the usual
    ``for epoch in range(start, n): sampler.set_epoch(epoch)`` loop resumes exactly.
    """

    def __init__(self, source: Any, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 tail: TailPolicy = "drop", window: int = 65536, shuffle: bool = True,
                 seq_len: int | None = None, lengths: np.ndarray | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} is not within world_size {world_size}")
        if tail not in ("drop", "pad", "wrap"):
            raise StoreError(f"tail policy {tail!r} is unknown", fix="use 'drop', 'pad' or 'wrap'")
        self.source = source
        self.order = order_for(source, seed=seed, window=window, shuffle=shuffle)
        self.rank, self.world_size, self.tail = rank, world_size, tail
        self.seq_len = seq_len
        self._lengths = lengths
        if seq_len is not None and lengths is None and not hasattr(source, "lengths"):
            raise StoreError("packing by seq_len needs sample lengths", fix="pass lengths= or a store as source")
        self.epoch = 0
        self.consumed = 0
        self._plan: EpochPass | None = None
        self._done = 0

    # -- state -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless the sampler is already in it (a resume)."""
        self._fold()
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict:
        """Where this rank's stream stands; equal on every rank that consumed in lockstep."""
        return self.state_after(self._done)

    def state_after(self, units_done: int) -> dict:
        """The state once this rank has consumed ``units_done`` units of the current pass.

        With prefetching DataLoaders the sampler runs ahead of the training loop:
        pass the number of units the loop has actually used (or use
        :class:`~stages.store.loader.TokenBatches`, whose batches carry their state).
        """
        return self._current().state(units_done)

    def _state(self, epoch: int, consumed: int) -> dict:
        state: dict[str, Any] = {"epoch": epoch, "samples_consumed": consumed, "order": self.order.digest,
                                 "tail": self.tail, "seq_len": self.seq_len}
        if isinstance(self.order, MixtureOrder):
            position = epoch * len(self.order) + consumed
            state["mixture"] = {"weights": list(self.order.weights), "position": position,
                                "cursors": self.order.cursors(position)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; any world size works as long as the global batch is kept."""
        if state.get("order") != self.order.digest:
            raise StoreError("sampler state belongs to another store, seed, window or mixture",
                             fix="resume with the same data and sampler settings, or start a fresh run")
        if state.get("seq_len") != self.seq_len:
            raise StoreError(f"sampler state was packed to seq_len {state.get('seq_len')}, not {self.seq_len}",
                             fix="resume with the same seq_len")
        epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
        if not 0 <= consumed <= len(self.order):
            raise StoreError(f"samples_consumed {consumed} is outside the epoch (0..{len(self.order)})")
        mix = state.get("mixture")
        if isinstance(self.order, MixtureOrder) and mix is not None:
            position = epoch * len(self.order) + consumed
            if mix.get("weights") != list(self.order.weights) or mix.get("cursors") != self.order.cursors(position):
                raise StoreError("mixture state does not match these weights", fix="resume with the same weights")
        self.epoch, self.consumed, self._plan, self._done = epoch, consumed, None, 0

    # -- planning --------------------------------------------------------------------------
    def _fold(self) -> None:
        """Turn progress within the current pass into the (epoch, consumed) it stands for."""
        if self._plan is not None:
            self.epoch, self.consumed = self._plan.position_after(self._done, self._plan.finished)
        self._plan, self._done = None, 0

    def _current(self) -> EpochPass:
        if self._plan is None:
            self._plan = EpochPass(self, self.epoch, self.consumed)
        return self._plan

    def begin_pass(self) -> EpochPass:
        """The rest of the current epoch from the current position; iterating it advances this sampler."""
        self._fold()
        return self._current()

    @property
    def plan(self) -> EpochPlan:
        return self._current().summary

    def dropped_ids(self) -> np.ndarray:
        """Sample ids this epoch leaves out under ``tail='drop'`` (empty otherwise)."""
        return self._current().dropped_ids()

    def __len__(self) -> int:
        return self._current().summary.per_rank

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = np.asarray(self.source.lengths(), dtype=np.int64)
        return self._lengths

    def __iter__(self) -> Iterator[Any]:
        return self.begin_pass().units()


class EpochPass:
    """The units of one epoch from a resume point: positions, ranks, and the tail."""

    def __init__(self, sampler: DistributedSampler, epoch: int, start: int):
        self.s, self.epoch, self.start = sampler, epoch, start
        self.finished = False
        self.ids: dict[int, np.ndarray] = {}
        order, W = sampler.order, sampler.world_size
        self.size = len(order)
        self.packed = sampler.seq_len is not None
        if self.packed:
            ids = self.ids[epoch] = order.epoch(epoch)
            ends = plan_sequences(sampler.lengths()[ids[start:]], sampler.seq_len, ids=ids[start:]) + start
            self.unit_epoch = np.full(len(ends), epoch, np.int64)
            self.unit_start = np.concatenate([[start], ends[:-1]]).astype(np.int64)
            self.unit_end = ends
        U = (self.size - start) if not self.packed else len(self.unit_end)
        if sampler.tail == "drop":
            K = U // W
        else:
            K = -(-U // W)
        extra = K * W - U
        if self.packed and extra:
            self._extend(extra)
        self.count, self.per_rank, self.extra = U, K, extra
        self.summary = EpochPlan(
            epoch=epoch, start=start, units=U, per_rank=K, dropped=U - K * W if sampler.tail == "drop" else 0,
            padded=extra if sampler.tail == "pad" else 0, borrowed=extra if sampler.tail == "wrap" else 0,
        )

    def _ids(self, epoch: int) -> np.ndarray:
        if epoch not in self.ids:
            self.ids[epoch] = self.s.order.epoch(epoch)
        return self.ids[epoch]

    def _extend(self, extra: int) -> None:
        """Packed units beyond the epoch: from this epoch's start (pad) or the next epochs (wrap)."""
        epochs, starts, ends = [], [], []
        e = self.epoch if self.s.tail == "pad" else self.epoch + 1
        while len(starts) < extra:
            ids = self._ids(e)
            cut = plan_sequences(self.s.lengths()[ids], self.s.seq_len, ids=ids)
            n = min(extra - len(starts), len(cut))
            starts += np.concatenate([[0], cut[:-1]])[:n].tolist()
            ends += cut[:n].tolist()
            epochs += [e] * n
            if self.s.tail == "wrap":
                e += 1
        self.unit_epoch = np.concatenate([self.unit_epoch, epochs]).astype(np.int64)
        self.unit_start = np.concatenate([self.unit_start, starts]).astype(np.int64)
        self.unit_end = np.concatenate([self.unit_end, ends]).astype(np.int64)

    def _extra_position(self, q: int) -> tuple[int, int]:
        """(epoch, position) of the ``q``-th plain unit past the end of this epoch."""
        if self.s.tail == "pad":
            return self.epoch, q % self.size
        return self.epoch + 1 + q // self.size, q % self.size

    def state(self, k: int) -> dict:
        """The sampler state once this rank has consumed ``k`` units of this pass."""
        return self.s._state(*self.position_after(k))

    def units(self) -> Iterator[Any]:
        """This rank's units; the sampler follows along, so its state_dict() is exact without prefetching."""
        for k, unit in enumerate(self.rank_units()):
            if self.s._plan is self:
                self.s._done = k + 1
            yield unit
        self.finished = True
        if self.s._plan is self:
            self.s._fold()

    def position_after(self, k: int, finished: bool = False) -> tuple[int, int]:
        """(epoch, samples consumed) after ``k`` units per rank; a pass with no units ends only once iterated."""
        W = self.s.world_size
        if k < self.per_rank or (k == 0 and not finished):
            if k <= 0:
                return self.epoch, self.start
            j = k * W - 1
            end = int(self.unit_end[j]) if self.packed else self.start + j + 1
            return self.epoch, end
        # the pass is complete (or holds nothing for this world size)
        if self.s.tail != "wrap" or self.extra == 0:
            return self.epoch + 1, 0
        if self.packed:
            epoch, end = int(self.unit_epoch[-1]), int(self.unit_end[-1])
        else:
            epoch, pos = self._extra_position(self.extra - 1)
            end = pos + 1
        return (epoch + 1, 0) if end >= self.size else (epoch, end)

    def dropped_ids(self) -> np.ndarray:
        if self.s.tail != "drop" or self.summary.dropped == 0:
            return np.empty(0, np.int64)
        if self.packed:
            first = self.per_rank * self.s.world_size
            return self._ids(self.epoch)[int(self.unit_start[first]): self.size]
        return self.s.order.slice(self.epoch, self.start + self.per_rank * self.s.world_size, self.size)

    def rank_units(self) -> Iterator[Any]:
        W, r, K = self.s.world_size, self.s.rank, self.per_rank
        if self.packed:
            for k in range(K):
                j = r + k * W
                ids = self._ids(int(self.unit_epoch[j]))
                yield ids[int(self.unit_start[j]): int(self.unit_end[j])].tolist()
            return
        chunk = 4096
        main = min(K, max(0, -(-(self.count - r) // W)))  # units of this rank inside the epoch
        for k0 in range(0, main, chunk):
            k1 = min(main, k0 + chunk)
            lo = self.start + r + k0 * W
            ids = self.s.order.slice(self.epoch, lo, lo + (k1 - k0 - 1) * W + 1)[::W]
            yield from ids.tolist()
        for k in range(main, K):
            epoch, pos = self._extra_position(r + k * W - self.count)
            yield int(self.s.order.slice(epoch, pos, pos + 1)[0])
