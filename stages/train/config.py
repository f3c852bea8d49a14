"""What the train stage hands each Ray Train worker: one frozen, typed config instead of a dict of keys.

The stage (``stages.train``) builds a :class:`TrainLoopConfig` from the pipeline file and the token
stores; Ray pickles it to every worker, where ``loop.train_loop`` reads it by attribute. A reader (and a
type checker) can follow each value from the YAML to the worker by its type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # the loop imports these on the worker; the stage module stays free of torch
    from arpipe.schemas.train import EmaSpec
    from arpipe.stages.models import ModelConfig, ScaleInput, VocabLayout
    from arpipe.stages.models.tokenunify import ObjectiveMix
    from arpipe.stages.train.data import StoreSummary
    from arpipe.stages.train.init import InitialWeights

#: held-out samples scored per evaluation (the first ones of the held-out store)
HELDOUT_SAMPLES = 256


@dataclass(frozen=True)
class TrainLoopConfig:
    """Everything ``train_loop`` needs on every rank; built once by the train stage."""

    #: the driver's AWS_/MLFLOW_/ARPIPE_ environment, set on the worker (a shared cluster may predate it)
    env: dict[str, str]
    seed: int
    #: one vocabulary over all stores (tokenizer ranges, classes) and the validated model shape
    vocab: VocabLayout
    model: ModelConfig
    #: the training stores, their vocabulary range names and mixture weights, in ``data:`` order
    summaries: tuple[StoreSummary, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]
    seq_len: int
    packing: bool
    #: the generated DeepSpeed config with the user's ``deepspeed.config`` merged over it
    ds_config: dict[str, Any]
    total_steps: int
    grad_accum: int
    micro_batch: int
    log_every: int
    print_every: int | None
    eval_every: int
    checkpoint_every: int
    #: where rank 0 logs metrics: the stage's nested MLflow run (None: lineage is off)
    tracking_uri: str | None
    mlflow_run_id: str | None
    #: parameter count for MFU under ZeRO-3, where a rank holds only its partition
    n_params: int
    #: VAR's next-scale inputs by vocabulary range name (empty for the other paradigms)
    scale_inputs: dict[str, ScaleInput] = field(default_factory=dict)
    #: the held-out store, scored teacher-forced every ``eval_every`` steps (None: no held-out scores)
    heldout: StoreSummary | None = None
    #: the vocabulary range a held-out store that is not a training store is read as
    heldout_name: str = ""
    heldout_samples: int = HELDOUT_SAMPLES
    #: the stage's name, for the lines the loop prints (``[name] resumed at step ...``)
    stage: str = "train"
    #: the trained weights to start from (``init_from``; None: a fresh model)
    init: InitialWeights | None = None
    #: parameter-name patterns kept fixed (``freeze``)
    freeze: tuple[str, ...] = ()
    #: the EMA each rank keeps of its share of the weights (``ema``; None: none)
    ema: EmaSpec | None = None
    #: TokenUnify's mixture of objectives (``objective``; None: next-token prediction alone)
    objective: ObjectiveMix | None = None
    #: torch.compile each transformer block (``compile``)
    compile: bool = False
    #: megabatches sorted by length and micro-batches padded to their longest document (``group_by_length``)
    group_by_length: bool = False

    @property
    def uris(self) -> list[str]:
        return [s.uri for s in self.summaries]
