"""Config of the ``train`` stage: data mixture, model, DeepSpeed, optimizer, budget."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from arpipe.schemas.base import StageBase, Strict


class DataSource(Strict):
    store: str = Field(description="A token store URI, usually `${tokenize.store}`.")
    weight: float = Field(1.0, gt=0, description="Share of this store in the mixture (normalized).")


class ModelSpec(Strict):
    preset: Literal["tiny", "small", "1b", "3b"] = Field("tiny", description="Model size preset.")
    paradigm: Literal["next_token", "next_scale", "next_block", "masked", "next_level"] = Field(
        "next_token", description="What the model predicts at once: `next_token` the next token, `next_scale` "
                                  "the next whole scale (VAR; needs msvq stores), `next_block` the next "
                                  "block_size tokens (NBP), `masked` every masked token of a bidirectional "
                                  "sequence (MaskGIT: a cosine-scheduled share masked in training, decoded in a "
                                  "few confidence-ordered parallel steps; needs a fixed token layout), "
                                  "`next_level` the next whole octree level (G3PT: each cell at its 3-D "
                                  "coordinates, attending every coarser level; needs octree stores).")
    block_size: int = Field(16, ge=1, description="Tokens per block for next_block (NBP).")
    n_embd: int | None = Field(None, ge=8, description="Width; overrides the preset.")
    n_layer: int | None = Field(None, ge=1, description="Depth; overrides the preset.")
    n_head: int | None = Field(None, ge=1, description="Attention heads; overrides the preset.")
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size (default: exactly what the stores "
                                                            "need; larger leaves room for later modalities).")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="Condition dropout for classifier-free guidance.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: "
                                                              "less memory for more compute.")
    attention: Literal["auto", "sdpa", "flex", "dense"] = Field(
        "dense", description="Attention kernel; all give the dense mask's result up to float rounding. "
                             "`dense` (the default, so models train as before) passes the full (L x L) mask; `sdpa` runs causal/unmasked SDPA calls where every row has the "
                            "same groups and no packed documents (dense otherwise); `flex` a block-sparse "
                            "flex_attention mask (CUDA; on CPU no backward, so dense); `auto` picks sdpa "
                            "where exact, else flex on CUDA, else dense.")


class DeepSpeedSpec(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage 0-3.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training dtype; fp16 uses dynamic "
                                                                          "loss scaling.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state offload to CPU (stage >= 1).")
    offload_params: bool = Field(False, description="ZeRO parameter offload to CPU (stage 3).")
    gradient_clipping: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 is off.")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="Merged over the generated DeepSpeed config (for experts).")
    config_file: str | None = Field(None, description="A DeepSpeed JSON config (ds_config.json; a path relative "
                                                      "to the pipeline file's folder, or s3://) merged over the "
                                                      "generated config, `config` over it; \"auto\" takes arpipe's "
                                                      "value, and keys this stage's fields decide (ZeRO stage, "
                                                      "precision, batch sizes, clipping, offload, optimizer) must "
                                                      "agree with them.")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class OptimizerSpec(Strict):
    lr: float | None = Field(None, gt=0, description="Peak AdamW learning rate, reached after warmup_steps "
                                                      "(default: by model width, 1e-3 up to 256 wide, 3e-4 up to "
                                                      "1024, 2e-4 up to 2048, 1.5e-4 above).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW's [beta1, beta2].")
    weight_decay: float = Field(0.05, ge=0, description="AdamW's decoupled weight decay.")
    warmup_steps: int | None = Field(None, ge=0, description="Steps that warm the learning rate up from 0 to "
                                                            "lr before the cosine decay (default: 5% of the "
                                                            "steps, at most 2000).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")


class EmaSpec(Strict):
    """An exponential moving average of the weights, saved beside them (``ema.safetensors``)."""

    decay: float = Field(0.999, gt=0, lt=1, description="ema = decay x ema + (1 - decay) x weights, from the "
                                                         "initial weights (as torch's AveragedModel and timm's "
                                                         "ModelEmaV2).")
    every: int = Field(1, ge=1, description="Optimizer steps between updates.")


class RegisterSpec(Strict):
    name: str = Field(min_length=1, description="Registered model name (created when new).")
    alias: str | None = Field(None, description="An alias (e.g. `champion`) moved to the new version.")


DEFAULT_EPOCHS = 20.0   # measured on 1500 digits: docs/training.md, sizing a budget


class ObjectiveSpec(Strict):
    """TokenUnify's mixture of objectives for a next_token model; the weights are normalized."""

    random_token: float = Field(0.0, ge=0, description="Weight of random-token prediction: a cosine-scheduled "
                                "share of a document's tokens hidden and predicted from all the others.")
    next_token: float = Field(1.0, ge=0, description="Weight of next-token prediction (the plain objective).")
    next_all: float = Field(0.0, ge=0, description="Weight of next-all-token prediction: every token after a "
                            "random cut predicted at once from the tokens before it.")

    @model_validator(mode="after")
    def _positive(self) -> ObjectiveSpec:
        if self.random_token + self.next_token + self.next_all <= 0:
            raise ValueError("the objective weights sum to 0; give at least one of random_token, next_token, "
                             "next_all a positive weight")
        return self


class TrainStage(StageBase):
    """Trains an AR generator with DeepSpeed ZeRO under Ray Train; output ``model``."""

    runtime_fields: ClassVar[frozenset[str]] = StageBase.runtime_fields | {
        "use_gpu", "max_failures", "checkpoint_every", "eval_every", "log_every", "print_every", "registration"}
    output_names: ClassVar[tuple[str, ...]] = ("model",)

    # a spec sent to a worker is rebuilt from its dump, which names `register` by its attribute
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    kind: Literal["train"]
    data: list[DataSource] = Field(min_length=1, description="Token stores to train on, mixed by weight.")
    heldout: str | None = Field(None, description="Token store for held-out loss (default: none).")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model size and training paradigm.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec,
                                     description="ZeRO stage, offload, precision and gradient clipping.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec,
                                     description="AdamW and its warm-up + cosine learning-rate schedule.")
    ema: EmaSpec | None = Field(None, description="Keep an EMA of the fp32 master weights on every rank (each "
                                                  "rank its ZeRO share), checkpointed with them; the model "
                                                  "folder then holds `ema.safetensors` beside the raw weights, "
                                                  "and sample uses it by default (default: none).")
    global_batch: int = Field(32, ge=1, description="Sequences per optimizer step, over all workers.")
    micro_batch: int | None = Field(None, ge=1, description="Sequences per worker per forward (default: "
                                                               "global_batch / workers, no accumulation).")
    seq_len: int | None = Field(None, ge=2, description="Packed sequence length (default: longest sample + 2).")
    packing: bool = Field(False, description="Pack samples into seq_len with document masks.")
    group_by_length: bool = Field(False, description="Batches of similar length (Hugging Face's "
                                  "`group_by_length`): the data order is cut into megabatches of 50 global "
                                  "batches, each sorted by length, longest first, and each micro-batch is padded "
                                  "only to its longest document instead of seq_len: less compute on stores of "
                                  "mixed lengths. Still exactly resumable; no effect where every document has "
                                  "one length. Not with packing, which already fills rows.")
    steps: int | None = Field(None, ge=1, description="Budget in optimizer steps (give at most one of steps, "
                                                     "epochs, tokens; none given: epochs 20).")
    epochs: float | None = Field(None, gt=0, description="Budget in passes over the training samples, rounded "
                                                         "up to whole steps.")
    tokens: int | None = Field(None, ge=1, description="Budget in tokens, counted as global_batch x seq_len per "
                                                       "step and rounded up to whole steps.")
    seed: int = Field(0, description="Seeds model initialization, data order and condition dropout.")
    workers: int = Field(1, ge=1, description="Ray Train workers (processes).")
    use_gpu: bool = Field(False, description="One GPU per worker, with NCCL; false trains on CPU with gloo.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (and resumable units).")
    eval_every: int = Field(100, ge=1, description="Steps between held-out loss evaluations (when heldout is "
                                                   "given).")
    log_every: int = Field(1, ge=1, description="Steps between metric rows (loss, lr, tokens/s, grad norm, "
                                                "MFU on GPU) logged to MLflow (they reach it at least every "
                                                "10 s).")
    print_every: int | None = Field(None, ge=1, description="Steps between rank 0's progress lines on the console "
                                                            "(step/total, loss, lr, tokens/s, elapsed, ETA); a "
                                                            "line also comes whenever 10 s pass without one. "
                                                            "Default: only the 10-s clock, so that a fast loop "
                                                            "with `log_every: 1` does not flood the console.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the last checkpoint.")
    init_from: str | None = Field(None, description="Start from these weights instead of random ones: a model "
                                                    "folder (`${pretrain.model}`), `models:/NAME@alias`, "
                                                    "`models:/NAME/VERSION` or `models:/m-<id>`. Width, depth, "
                                                    "heads and paradigm must match; the vocabulary may grow "
                                                    "(new rows start as a fresh model's).")
    freeze: list[str] = Field(default_factory=list, description="Parameter-name patterns (fnmatch, e.g. "
                                                                "`blocks.0.*`, `tok_emb.*`) kept fixed in training.")
    compile: bool = Field(False, description="torch.compile each transformer block (regional compilation; "
                          "eager with one warning where it cannot compile, and under ZeRO-3).")
    objective: ObjectiveSpec | None = Field(None, description=(
        "TokenUnify's mixture of random-token, next-token and next-all-token prediction, by weight, each "
        "document of a batch under one of them (next_token models; default: next-token prediction alone)."))
    # `register` in YAML; the attribute has another name because ABCMeta.register is a class attribute
    registration: RegisterSpec | None = Field(None, alias="register", description=(
        "Register the trained model in the MLflow Model Registry as a new version of `name`, with `alias`."))

    @model_validator(mode="after")
    def _budget_and_batch(self) -> TrainStage:
        given = [n for n in ("steps", "epochs", "tokens") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget: steps, epochs or tokens (got {', '.join(given)})")
        if not given:   # 20 passes: where a tiny model's held-out loss flattens on small image data
            self.epochs = DEFAULT_EPOCHS
        if self.objective is not None and self.model.paradigm != "next_token":
            raise ValueError(f"objective mixes next-token objectives (TokenUnify); this model is "
                             f"{self.model.paradigm}: remove objective, or use paradigm: next_token")
        micro = self.micro_batch or max(1, self.global_batch // self.workers)
        if self.global_batch % (self.workers * micro):
            raise ValueError(f"global_batch {self.global_batch} does not divide by workers x micro_batch "
                             f"({self.workers} x {micro}); make it a multiple of {self.workers * micro}")
        return self

    @model_validator(mode="after")
    def _group_by_length_or_packing(self) -> TrainStage:
        if self.group_by_length and self.packing:
            raise ValueError("group_by_length pads each micro-batch to its longest document, and packing already "
                             "fills every row to seq_len; drop one of them (group_by_length: false or packing: "
                             "false)")
        return self

    @property
    def micro(self) -> int:
        return self.micro_batch or self.global_batch // self.workers

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.workers * self.micro)
