"""Fixed-length training sequences from variable-length samples.

``pack`` puts consecutive samples (in the sampler's order) into one sequence
until the next would not fit, and records document boundaries so attention can
be masked per document (``doc_ids``, or ``cu_seqlens`` for varlen kernels).
``pad`` puts one sample per sequence and pads the rest. A sample is never cut:
a visual token grid split across sequences would lose its spatial meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .format import StoreError
from .reader import Batch

PackMode = Literal["pack", "pad"]


def plan_sequences(lengths: np.ndarray, seq_len: int, *, ids: np.ndarray | None = None) -> np.ndarray:
    """End (exclusive) of each greedy sequence over ``lengths`` taken in order.

    Greedy in order is what makes packing resumable: from any sequence boundary
    the rest of the plan is the same as if it had never been interrupted.
    ``ids`` (the sample ids behind ``lengths``) only serve error messages.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if seq_len <= 0:
        raise StoreError(f"seq_len must be positive, got {seq_len}")
    if lengths.size == 0:
        return np.empty(0, np.int64)
    too_long = np.flatnonzero(lengths > seq_len)
    if too_long.size:
        p = int(too_long[0])
        which = f"sample {int(ids[p])}" if ids is not None else f"sample at position {p}"
        raise StoreError(f"{which} has {int(lengths[p])} tokens, more than seq_len {seq_len}",
                         fix=f"raise seq_len to at least {int(lengths.max())}")
    if (lengths == lengths[0]).all():  # the common case for image tokens: closed form
        per = seq_len // int(lengths[0])
        return np.append(np.arange(per, lengths.size, per, dtype=np.int64), lengths.size)
    ends = []
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > seq_len:
            ends.append(i)
            used = 0
        used += n
    ends.append(lengths.size)
    return np.asarray(ends, dtype=np.int64)


@dataclass
class PackedBatch:
    """``n`` sequences of ``seq_len`` tokens ready for a model.

    ``doc_ids`` is -1 on padding, else the document's number within its row;
    ``position_ids`` restart at 0 for each document; ``cu_seqlens`` are the
    cumulative lengths of every document and padding run over the flattened
    ``(n * seq_len)`` tokens, the layout varlen attention kernels take.
    """

    tokens: np.ndarray        # (n, seq_len) int64
    doc_ids: np.ndarray       # (n, seq_len) int32
    position_ids: np.ndarray  # (n, seq_len) int32
    loss_mask: np.ndarray     # (n, seq_len) bool, False on padding
    cu_seqlens: np.ndarray    # (segments + 1,) int32
    sample_indices: list[list[int]]
    conditions: list[list]

    def torch(self) -> dict:
        import torch

        return {
            "tokens": torch.from_numpy(self.tokens), "doc_ids": torch.from_numpy(self.doc_ids),
            "position_ids": torch.from_numpy(self.position_ids), "loss_mask": torch.from_numpy(self.loss_mask),
            "cu_seqlens": torch.from_numpy(self.cu_seqlens),
        }


class SequencePacker:
    """Lays out the samples of sampler units (lists of sample ids, one list per sequence) as a :class:`PackedBatch`."""

    def __init__(self, seq_len: int, *, mode: PackMode = "pack", pad_id: int = 0):
        if mode not in ("pack", "pad"):
            raise StoreError(f"packing mode {mode!r} is unknown", fix="use 'pack' or 'pad'")
        if seq_len <= 0:
            raise StoreError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.mode, self.pad_id = int(seq_len), mode, int(pad_id)

    def pack(self, units: list[list[int]], batch: Batch, conditions: list | None = None) -> PackedBatch:
        """``batch`` holds the units' samples in order (as gathered from ``sum(units, [])``)."""
        n, L = len(units), self.seq_len
        tokens = np.full((n, L), self.pad_id, np.int64)
        doc_ids = np.full((n, L), -1, np.int32)
        position_ids = np.zeros((n, L), np.int32)
        segments = [0]
        conds: list[list] = []
        first = 0
        for row, unit in enumerate(units):
            if self.mode == "pad" and len(unit) != 1:
                raise StoreError(f"pad mode takes one sample per sequence, got {len(unit)}",
                                 fix="use a sampler without seq_len for pad mode")
            last = first + len(unit)
            lo, hi = int(batch.offsets[first]), int(batch.offsets[last])
            if hi - lo > L:
                raise StoreError(f"samples {unit} have {hi - lo} tokens, more than seq_len {L}",
                                 fix=f"raise seq_len to at least {hi - lo}")
            tokens[row, : hi - lo] = batch.tokens[lo:hi]
            doc_lengths = np.diff(batch.offsets[first: last + 1])
            doc_ids[row, : hi - lo] = np.repeat(np.arange(len(unit), dtype=np.int32), doc_lengths)
            starts = np.repeat(batch.offsets[first:last] - lo, doc_lengths)
            position_ids[row, : hi - lo] = np.arange(hi - lo, dtype=np.int32) - starts
            for d in doc_lengths.tolist():
                segments.append(segments[-1] + d)
            if hi - lo < L:
                segments.append(segments[-1] + L - (hi - lo))
            conds.append(conditions[first:last] if conditions is not None else [None] * len(unit))
            first = last
        return PackedBatch(
            tokens=tokens, doc_ids=doc_ids, position_ids=position_ids, loss_mask=doc_ids >= 0,
            cu_seqlens=np.asarray(segments, np.int32), sample_indices=[list(u) for u in units], conditions=conds,
        )
