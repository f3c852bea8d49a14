"""The token store: sharded, checksummed token files with a manifest, readers, samplers and packing.

Write with :class:`ShardWriter` (one per input partition, in parallel) plus
:func:`write_manifest`, or :class:`StoreWriter` in one process; read with
:meth:`TokenStore.open`; order with :class:`DistributedSampler`; batch for
training with :class:`TokenBatches` (imports torch). The layout is DESIGN.md's "Token store".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arpipe.schemas.store import ShardInfo, StoreManifest, TokenizerRef, VocabLayout, VocabRange

from .format import FORMAT_VERSION, StoreError, dtype_for_vocab
from .mixture import StoreMixture
from .order import MixtureOrder, ShuffledOrder
from .packing import PackedBatch, SequencePacker, plan_sequences
from .reader import Batch, Sample, TokenStore, read_manifest
from .sampler import DistributedSampler, EpochPass, EpochPlan
from .writer import ShardWriter, StoreWriter, read_shard_info, write_manifest

if TYPE_CHECKING:
    from .loader import TokenBatches


def __getattr__(name: str):
    # TokenBatches needs torch; import it only when asked for
    if name == "TokenBatches":
        from .loader import TokenBatches

        return TokenBatches
    raise AttributeError(name)


__all__ = [
    "FORMAT_VERSION", "Batch", "DistributedSampler", "EpochPass", "EpochPlan", "MixtureOrder", "PackedBatch",
    "Sample", "SequencePacker", "ShardInfo", "ShardWriter", "ShuffledOrder", "StoreError", "StoreManifest",
    "StoreMixture", "StoreWriter", "TokenBatches", "TokenStore", "TokenizerRef", "VocabLayout", "VocabRange",
    "dtype_for_vocab", "plan_sequences", "read_manifest", "read_shard_info", "write_manifest",
]
