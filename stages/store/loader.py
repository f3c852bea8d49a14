"""Training batches from a store (or mixture) whose resume point rides along with each batch.

A DataLoader prefetches: by the time the loop trains on batch ``b`` the
sampler may have produced batches ``b+1..b+k``. So each batch carries
``state``, the sampler position right after it; checkpoint the state of the
last batch trained on. Batches are dealt round-robin to DataLoader workers
(worker ``w`` builds batches ``w, w+n, ...``), which is the order the
DataLoader yields them in: the stream is the same for any ``num_workers``.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .format import StoreError
from .packing import SequencePacker
from .sampler import DistributedSampler

Layout = Literal["stack", "pad", "pack"]


class TokenBatches(IterableDataset):
    """Batches of ``batch_size`` units for one rank; use ``DataLoader(ds, batch_size=None, num_workers=n)``.

    ``layout``: ``stack`` gives ``tokens`` as ``(B, *shape)`` (all samples the same
    shape); ``pad`` one sample per sequence of ``seq_len``; ``pack`` several (the
    sampler must be built with the same ``seq_len``). After a full pass, call
    ``ds.sampler.load_state_dict(last_batch["state"])`` (or ``set_epoch``) to go on.
    """

    def __init__(self, source: Any, sampler: DistributedSampler, batch_size: int, *, layout: Layout = "stack",
                 seq_len: int | None = None, pad_id: int = 0, readahead: int = 2):
        if batch_size <= 0:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        if layout == "pack" and (seq_len is None or sampler.seq_len != seq_len):
            raise StoreError(f"layout 'pack' needs a sampler built with seq_len={seq_len}",
                             fix="pass the same seq_len to DistributedSampler and TokenBatches")
        if layout != "pack" and sampler.seq_len is not None:
            raise StoreError(f"a packing sampler (seq_len {sampler.seq_len}) needs layout 'pack'")
        if layout == "pad" and seq_len is None:
            raise StoreError("layout 'pad' needs seq_len")
        if layout not in ("stack", "pad", "pack"):
            raise StoreError(f"layout {layout!r} is unknown", fix="use 'stack', 'pad' or 'pack'")
        self.source, self.sampler, self.batch_size, self.layout = source, sampler, batch_size, layout
        self.readahead = readahead
        self.packer = SequencePacker(seq_len, mode=layout, pad_id=pad_id) if layout != "stack" else None

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # a worker iterates its own copy of the sampler; in-process iteration advances the caller's
        epoch_pass = self.sampler.begin_pass()
        units = epoch_pass.units()
        group = workers * (self.readahead + 1)  # batches read ahead together; a multiple of workers
        done, batch_no = 0, 0
        while pending := list(itertools.islice(units, group * self.batch_size)):
            self._prefetch(pending, worker, workers)
            for lo in range(0, len(pending), self.batch_size):
                chunk = pending[lo: lo + self.batch_size]
                done += len(chunk)
                if batch_no % workers == worker:
                    yield self._build(chunk, epoch_pass.state(done))
                batch_no += 1

    def _ids(self, units: list) -> list[int]:
        return list(itertools.chain.from_iterable(units)) if self.layout == "pack" else list(units)

    def _prefetch(self, pending: list, worker: int, workers: int) -> None:
        bs = self.batch_size
        mine = [u for b in range(worker, -(-len(pending) // bs), workers) for u in pending[b * bs: (b + 1) * bs]]
        if mine:
            self.source.prefetch(self._ids(mine))

    def _build(self, units: list, state: dict) -> dict:
        ids = self._ids(units)
        batch = self.source.gather(ids)
        conditions = self.source.conditions(ids)
        if self.packer is None:
            return {"tokens": torch.from_numpy(batch.stack().astype(np.int64)),
                    "indices": torch.as_tensor(ids, dtype=torch.int64), "conditions": conditions, "state": state}
        seqs = units if self.layout == "pack" else [[u] for u in units]
        packed = self.packer.pack(seqs, batch, conditions)
        return {**packed.torch(), "indices": packed.sample_indices, "conditions": packed.conditions, "state": state}
