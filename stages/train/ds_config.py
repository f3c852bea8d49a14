"""The DeepSpeed config a train stage generates, with the user's `deepspeed.config` merged over it."""

from __future__ import annotations

import copy
from typing import Any

from arpipe.schemas.train import TrainStage


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` wins key by key; nested mappings merge instead of replacing each other."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: default peak learning rates by model width (n_embd up to the key): small models take large steps
LR_BY_WIDTH = ((256, 1e-3), (1024, 3e-4), (2048, 2e-4))
LR_WIDEST = 1.5e-4


def learning_rate(spec: TrainStage) -> float:
    """``optimizer.lr``, or the default for the model's width (measured on digits: docs/training.md)."""
    if spec.optimizer.lr is not None:
        return spec.optimizer.lr
    from arpipe.stages.models.config import PRESETS

    width = spec.model.n_embd or PRESETS[spec.model.preset]["n_embd"]
    return next((lr for wide, lr in LR_BY_WIDTH if width <= wide), LR_WIDEST)


def warmup_steps(spec: TrainStage, total_steps: int) -> int:
    """``optimizer.warmup_steps``, or 5% of the budget (at most 2000): long warmups waste short runs."""
    if spec.optimizer.warmup_steps is not None:
        return spec.optimizer.warmup_steps
    return min(2000, max(1, round(0.05 * total_steps)))


def build_ds_config(spec: TrainStage, total_steps: int) -> dict[str, Any]:
    """ZeRO stage, precision, offload, accumulation, clipping, AdamW and warmup+cosine from the stage config.

    On CPU, torch's AdamW (``torch_adam``) needs no compiled CPU-Adam op; with optimizer offload
    DeepSpeed's DeepSpeedCPUAdam is the supported path and is used instead.
    """
    ds = spec.deepspeed
    opt = spec.optimizer
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    if ds.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    config: dict[str, Any] = {
        "train_batch_size": spec.global_batch,
        "train_micro_batch_size_per_gpu": spec.micro,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": learning_rate(spec), "betas": list(opt.betas), "eps": 1e-8, "weight_decay": opt.weight_decay,
            **({} if ds.offload_optimizer else {"torch_adam": True})}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, warmup_steps(spec, total_steps) + 1),
            "warmup_num_steps": warmup_steps(spec, total_steps),
            "warmup_min_ratio": 0.0, "cos_min_ratio": opt.min_lr_ratio}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if spec.model.activation_checkpointing:
        config["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return deep_merge(config, ds.config)
