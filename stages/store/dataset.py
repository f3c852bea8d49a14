"""A token store as a PyTorch dataset, for a training loop of your own: map-style and per-sample streaming.

:class:`TokenDataset` is map-style: ``ds[i]`` is sample ``i`` (``store[i]``) as a
dict of ``tokens`` (a tensor in the sample's shape), ``index``, ``key``,
``modality`` and ``condition``. Any sampler works; arpipe's
:class:`~stages.store.sampler.DistributedSampler` splits by rank and resumes
exactly. :class:`TokenSamples` is its iterable twin: it walks one pass of a
``DistributedSampler`` (by default this rank's share of a shuffled epoch, rank
and world size taken from ``torch.distributed``) and deals the samples
round-robin to DataLoader workers. For whole batches that carry their resume
state, packing, and an order independent of the worker count, use
:class:`~stages.store.loader.TokenBatches`: these two are per-sample, for
per-sample transforms and the stock DataLoader batching.

Both go to DataLoader workers as they are: a spawned worker gets a pickled
store that reopens lazily; a forked one inherits the parent's memory maps
(private, copy-on-write: the file is never written), which hold no file
position and need no reopening.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .format import StoreError
from .sampler import DistributedSampler


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenDataset(Dataset):
    """Sample ``i`` of a store (or :class:`~stages.store.mixture.StoreMixture`) as a dict of tensors and metadata.

    ``index`` is ``i`` as asked; ``key``, ``modality`` and ``condition`` (the
    decoded label, None where unconditional) are the writer's.

    ``tokens`` has the sample's shape and ``dtype`` (int64 by default, what
    ``nn.Embedding`` takes; ``None`` keeps the store's uint16/uint32 as a
    zero-copy view of the mapped file). The stock ``default_collate`` batches
    samples of one shape with integer labels; :func:`collate_samples` also
    takes unconditional or text conditions and samples of different shapes.
    """

    def __init__(self, store: Any, *, dtype: torch.dtype | None = torch.int64):
        self.store = store
        self.dtype = dtype
        self._np_dtype = None if dtype is None else torch.empty(0, dtype=dtype).numpy().dtype

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.store[i]
        tokens = sample.tokens
        if self._np_dtype is not None:
            tokens = tokens.astype(self._np_dtype)
        elif not tokens.flags.writeable:  # remote reads are read-only bytes; torch wants memory it may write
            tokens = tokens.copy()
        return {"tokens": torch.from_numpy(tokens), "index": int(i), "key": sample.key,
                "modality": sample.modality, "condition": sample.condition}


class TokenSamples(IterableDataset):
    """The samples of one pass of ``sampler``, dealt round-robin to DataLoader workers (worker ``w`` gets ``w, w+n, ...``).

    Without a sampler: a shuffled epoch by ``seed`` (store order with
    ``shuffle=False``), split by the ``torch.distributed`` rank when a process
    group is initialised. Items are :class:`TokenDataset`'s. Iterating again
    continues with the sampler's next epoch; call ``sampler.set_epoch(e)`` to
    pick one.
    """

    def __init__(self, store: Any, sampler: DistributedSampler | None = None, *,
                 dtype: torch.dtype | None = torch.int64, seed: int = 0, shuffle: bool = True):
        if sampler is None:
            rank, world_size = distributed_rank()
            sampler = DistributedSampler(store, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        if sampler.seq_len is not None:
            raise StoreError(f"TokenSamples yields single samples; this sampler packs sequences of {sampler.seq_len}",
                             fix="use TokenBatches(..., layout='pack') for packed sequences")
        self.samples = TokenDataset(store, dtype=dtype)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in itertools.islice(self.sampler.begin_pass().units(), worker, None, workers):
            yield self.samples[i]


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`TokenDataset` items: ``tokens`` stacked when every sample has one shape, else a list;
    ``condition`` a tensor when every one is an integer label, else a list (None where unconditional)."""
    tokens = [item["tokens"] for item in items]
    conditions = [item["condition"] for item in items]
    same_shape = bool(tokens) and all(t.shape == tokens[0].shape for t in tokens)
    labels = bool(conditions) and all(type(c) is int for c in conditions)  # (bool is no label)
    return {"tokens": torch.stack(tokens) if same_shape else tokens,
            "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
            "key": [item["key"] for item in items], "modality": [item["modality"] for item in items],
            "condition": torch.tensor(conditions, dtype=torch.int64) if labels else conditions}
