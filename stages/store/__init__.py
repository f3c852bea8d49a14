"""The token store: sharded, checksummed token files with a manifest, readers, samplers and packing.

Write with :class:`ShardWriter` (one per input partition, in parallel) plus
:func:`write_manifest` (a stage does both in resumable units: :class:`StoreUnits`),
or :class:`StoreWriter` in one process; read with :meth:`TokenStore.open`; order
with :class:`DistributedSampler`; batch for training with :class:`TokenBatches`;
hand it to a training loop of your own as a PyTorch dataset with
:class:`TokenDataset` (map-style) or :class:`TokenSamples` (iterable; these three
import torch). The layout is DESIGN.md's "Token store".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arpipe.schemas.store import ShardInfo, StoreManifest, TokenizerRef, VocabLayout, VocabRange

from .format import FORMAT_VERSION, StoreError, dtype_for_vocab
from .mixture import StoreMixture
from .order import LengthGroupedOrder, MixtureOrder, ShuffledOrder, megabatch_size
from .packing import PackedBatch, SequencePacker, plan_sequences
from .quarantine import Reject, write_rejects
from .reader import Batch, Sample, TokenStore, read_manifest
from .sampler import DistributedSampler, EpochPass, EpochPlan
from .units import StoreUnits, UnitRecord, fan_out
from .writer import ShardWriter, StoreWriter, read_shard_info, write_manifest

if TYPE_CHECKING:
    from .dataset import TokenDataset, TokenSamples, collate_samples
    from .loader import TokenBatches

_NEED_TORCH = {"TokenBatches": "loader", "TokenDataset": "dataset", "TokenSamples": "dataset",
               "collate_samples": "dataset"}


def __getattr__(name: str):
    # these need torch; import them only when asked for
    if name in _NEED_TORCH:
        import importlib

        return getattr(importlib.import_module(f".{_NEED_TORCH[name]}", __name__), name)
    raise AttributeError(name)


__all__ = [
    "FORMAT_VERSION", "Batch", "DistributedSampler", "EpochPass", "EpochPlan", "LengthGroupedOrder", "MixtureOrder",
    "PackedBatch", "Reject", "Sample", "SequencePacker", "ShardInfo", "ShardWriter", "ShuffledOrder", "StoreError",
    "StoreManifest", "StoreMixture", "StoreUnits", "StoreWriter", "TokenBatches", "TokenDataset", "TokenSamples",
    "TokenStore", "TokenizerRef", "UnitRecord", "VocabLayout", "VocabRange", "collate_samples", "dtype_for_vocab",
    "fan_out", "megabatch_size", "plan_sequences", "read_manifest", "read_shard_info", "write_manifest",
    "write_rejects",
]
