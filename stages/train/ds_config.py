"""The DeepSpeed config a train stage generates, with the user's ds_config file and `deepspeed.config` over it.

Precedence, lowest first: the config generated from the stage's fields, the JSON file named by
``deepspeed.config_file``, the inline ``deepspeed.config``. Mappings merge key by key; a file's
``scheduler`` of another type than arpipe's replaces arpipe's whole (its parameters mean nothing to
another schedule). In the file, ``"auto"`` (Hugging Face's convention) takes arpipe's value, or
DeepSpeed's default where arpipe sets none. A key the stage's own fields decide (``DECIDED_BY``)
must agree with them: the file is refused otherwise, before Ray starts (``TrainStage.code_digest``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arpipe.pipeline.config import flatten
from arpipe.pipeline.digest import digest_json
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import normalize, storage_for
from arpipe.schemas.base import REF_PATTERN
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


def build_ds_config(spec: TrainStage, total_steps: int, config_file: ConfigFile | None = None) -> dict[str, Any]:
    """ZeRO stage, precision, offload, accumulation, clipping, AdamW and warmup+cosine from the stage config,
    then ``config_file`` (the stage's ds_config file, :func:`read_config_file`) and ``deepspeed.config`` over it.

    On CPU, torch's AdamW (``torch_adam``) needs no compiled CPU-Adam op; with optimizer offload
    DeepSpeed's DeepSpeedCPUAdam is the supported path and is used instead.
    """
    config = generated_config(spec, total_steps)
    if config_file is not None:
        config = merge_config_file(config, config_file, spec, steps_known=True)
    return deep_merge(config, spec.deepspeed.config)


def generated_config(spec: TrainStage, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config the stage's own fields give, before any user config."""
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
    return config


# ------------------------------------------------------------------------------------- the ds_config file

#: Hugging Face's convention in ds_config files: the value is the trainer's (here: arpipe's) to fill in
AUTO = "auto"

#: keys of a ds_config file that the stage's own fields decide: the file may leave them out, say "auto" or
#: agree; key -> the field that decides it
DECIDED_BY = {
    "train_batch_size": "global_batch",
    "train_micro_batch_size_per_gpu": "micro_batch",
    "gradient_accumulation_steps": "global_batch / (workers x micro_batch)",
    "gradient_clipping": "deepspeed.gradient_clipping",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_params",
    "bf16.enabled": "deepspeed.precision",
    "bfloat16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
    "optimizer.params.lr": "optimizer.lr",
    "optimizer.params.betas": "optimizer.betas",
    "optimizer.params.weight_decay": "optimizer.weight_decay",
    "scheduler.params.warmup_max_lr": "optimizer.lr",
    "scheduler.params.warmup_num_steps": "optimizer.warmup_steps",
    "scheduler.params.total_num_steps": "steps",
    "scheduler.params.cos_min_ratio": "optimizer.min_lr_ratio",
}
#: where arpipe's value of a key lives in the generated config when not under the key itself (``bfloat16`` is
#: DeepSpeed's older name of ``bf16``; another schedule's peak is arpipe's learning rate)
SAME_AS = {"bfloat16.enabled": "bf16.enabled", "scheduler.params.warmup_max_lr": "optimizer.params.lr"}


@dataclass(frozen=True)
class ConfigFile:
    """A user's ds_config file: its name as the pipeline gives it (for messages) and its JSON object."""

    name: str
    config: dict[str, Any]

    @property
    def digest(self) -> str:
        """Of the JSON object, not the bytes: reformatting the file does not rerun the stage."""
        return digest_json(self.config)


def read_config_file(name: str, base_dir: str | Path) -> ConfigFile:
    """Read and parse ``name`` (relative to ``base_dir``, the pipeline file's folder, or s3://)."""
    uri = normalize(name, base_dir)
    try:
        data = storage_for(uri).read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"deepspeed.config_file: no file {name}" + (f" ({uri})" if uri != name else ""),
                        fix="give a DeepSpeed JSON config's path relative to the pipeline file's folder, "
                            "or an s3:// URI") from None
    try:
        config = json.loads(data)
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON: {err.msg}", where=f"{name}:{err.lineno}:{err.colno}",
                        fix="DeepSpeed configs are plain JSON (double-quoted keys, no comments, "
                            "no trailing commas)") from None
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text ({err.reason} at byte {err.start})", where=name,
                        fix="save it as UTF-8 JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"holds a JSON {type(config).__name__}, not an object", where=name,
                        fix="a DeepSpeed config is one JSON object: {\"zero_optimization\": {...}, ...}")
    return ConfigFile(name, config)


def _lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _arpipe_value(generated: dict[str, Any], key: str) -> Any:
    value = _lookup(generated, SAME_AS.get(key, key))
    if key.endswith(".enabled"):
        return bool(value)
    if key.endswith(".device"):
        return value or "none"
    return value


def _agrees(key: str, value: Any, arpipe: Any) -> bool:
    if key.endswith(".device"):   # on or off is the stage's to say; which device (cpu, nvme) the file's
        return (value not in (None, "none")) == (arpipe != "none")
    if key.endswith(".enabled"):
        return bool(value) == arpipe
    return value == arpipe


def _setting(key: str, value: Any, spec: TrainStage) -> str:
    """The stage setting that would make the file's ``value`` of ``key`` arpipe's own."""
    field = DECIDED_BY[key]
    if key.endswith(".device"):
        return f"{field}: {json.dumps(value not in (None, 'none'))}"
    if key.endswith(".enabled"):
        precision = ("fp16" if key.startswith("fp16") else "bf16") if value else "fp32"
        return f"{field}: {precision}"
    if key == "gradient_accumulation_steps" and isinstance(value, int):
        return f"global_batch: {spec.workers * spec.micro * value}"
    if key == "train_micro_batch_size_per_gpu" and isinstance(value, int):
        return f"micro_batch: {value} (and global_batch a multiple of workers x {value})"
    return f"{field}: {json.dumps(value)}"


def _decider(key: str, spec: TrainStage) -> str:
    """The field that decides ``key``, with its value where the key's alone would not say it."""
    field = DECIDED_BY[key]
    return f"{field} ({spec.deepspeed.precision})" if key.endswith(".enabled") else field


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _resolve_auto(node: dict[str, Any], generated: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``node`` with every "auto" replaced by arpipe's value at its key, or dropped where arpipe sets none."""
    out: dict[str, Any] = {}
    for name, value in node.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            resolved = _resolve_auto(value, generated, key)
            if resolved or not value:   # a block that held only dropped autos goes too
                out[name] = resolved
        elif value == AUTO:
            arpipe = _lookup(generated, SAME_AS.get(key, key))
            if arpipe is not None:
                out[name] = copy.deepcopy(arpipe)
        else:
            out[name] = value
    return out


def merge_config_file(generated: dict[str, Any], file: ConfigFile, spec: TrainStage,
                      steps_known: bool) -> dict[str, Any]:
    """``file`` merged over ``generated``; a key the stage's fields decide set otherwise is refused.

    ``steps_known``: the step budget in ``generated`` is the real one (with ``epochs`` or ``tokens`` it is
    known only once the stores are read): otherwise the keys that depend on it are not compared.
    """
    unknown = set() if steps_known else {"scheduler.params.total_num_steps"} | (
        {"scheduler.params.warmup_num_steps"} if spec.optimizer.warmup_steps is None else set())
    conflicts = []
    for key, value in flatten(file.config).items():
        if key in DECIDED_BY and key not in unknown and value != AUTO:
            arpipe = _arpipe_value(generated, key)
            if not _agrees(key, value, arpipe):
                conflicts.append((key, value, arpipe))
    if len(conflicts) == 1:
        key, value, arpipe = conflicts[0]
        theirs, field, ours, setting = _show(value), _decider(key, spec), _show(arpipe), _setting(key, value, spec)
        raise UserError(f"{theirs} in the file, but this stage's {field} makes it {ours}", where=file.name, path=key,
                        fix=f"drop {key} from the file (or make it \"auto\"), or set {setting} in the stage")
    if conflicts:
        each = ", ".join(f"{key} {_show(value)} ({_decider(key, spec)} makes it {_show(arpipe)})"
                         for key, value, arpipe in conflicts)
        settings = ", ".join(_setting(key, value, spec) for key, value, _ in conflicts)
        raise UserError(f"{len(conflicts)} keys disagree with this stage's fields: {each}", where=file.name,
                        fix=f"drop them from the file (or make them \"auto\"), or set {settings} in the stage")
    user = _resolve_auto(file.config, generated)
    merged = deep_merge(generated, user)
    theirs, ours = user.get("scheduler"), generated["scheduler"]["type"]
    if isinstance(theirs, dict) and theirs.get("type", ours) != ours:
        merged["scheduler"] = theirs
    return merged


def check_config_file(spec: TrainStage, base_dir: str | Path) -> ConfigFile | None:
    """The stage's ds_config file, read and checked against its fields (None when it names none, or names an
    upstream output: that is read at run time). Cheap: no torch, no stores."""
    name = spec.deepspeed.config_file
    if not name or REF_PATTERN.search(name):
        return None
    file = read_config_file(name, base_dir)
    merge_config_file(generated_config(spec, spec.steps or 1), file, spec, steps_known=bool(spec.steps))
    return file
