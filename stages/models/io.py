"""Saving and loading models as safetensors + JSON: no pickle anywhere.

A model folder holds ``model.safetensors`` (weights), ``config.json``
(``{"format", "model_args"}``, enough to rebuild the module) and, when given,
``vocab.json`` (the :class:`~stages.models.vocab.VocabLayout` that maps the
model's ids to modalities) and, for a next-scale model fed VAR's accumulated
input, ``scale_inputs.safetensors`` (each tokenizer's codebook and input mix,
:class:`~stages.models.sequence.ScaleInput`, so sampling needs no tokenizer
to lay out its inputs). A model trained with ``ema:`` also holds
``ema.safetensors``: the exponential moving average of its weights, with
the same tensors as ``model.safetensors`` (``load_model(..., weights="ema")``).
Every file is written to a temporary name and renamed, so a crash never
leaves a half-written model that loads.

``config.json`` is written last and records the size and digest of every
other file written here (``"files"``): a weights file truncated or changed
after the fact is refused by :func:`verify_files` before it is used. Folders
written before the record existed carry none and load as they did.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from arpipe.pipeline.digest import digest_file
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import atomic_local_file, storage_for

from .config import ModelConfig
from .sequence import ScaleInput
from .transformer import Transformer
from .vocab import VocabLayout

MODEL_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
SCALE_INPUTS_FILE = "scale_inputs.safetensors"
_DAMAGED_FIX = ("the model folder was damaged after its train stage wrote it: restore it from a copy, or rerun "
                "that stage (`arpipe run PIPELINE --force STAGE`)")


def save_model(directory: str | Path, model: Transformer, *, vocab: VocabLayout | None = None,
               scale_inputs: dict[str, ScaleInput] | None = None, ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model folder; tied weights are stored once and re-tied on load.

    ``scale_inputs`` (vocabulary name -> :class:`ScaleInput`) go with a model whose ``feature_dim`` is set;
    ``ema`` (the model's state dict keys -> the EMA of each) is written beside the weights as ``ema.safetensors``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = storage_for(str(out))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    averaged = None
    if ema is not None:
        averaged = {k: ema[k].detach().reshape(v.shape).contiguous().cpu() for k, v in state.items() if k in ema}
        if averaged.keys() != state.keys():
            raise ValueError(f"the EMA has no {sorted(state.keys() - averaged.keys())[0]}; give one tensor per "
                             "entry of the model's state dict")
    for weights in (state, averaged):
        if weights is not None and model.config.tie_embeddings:
            weights.pop("head.weight", None)
    with atomic_local_file(out / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": str(MODEL_FORMAT)})
    if averaged is not None:
        with atomic_local_file(out / EMA_FILE) as tmp:
            save_file(averaged, tmp, metadata={"format": str(MODEL_FORMAT)})
    if vocab is not None:
        files.write_text(str(out / VOCAB_FILE), json.dumps(vocab.to_dict(), indent=2, sort_keys=True))
    if bool(model.config.feature_dim) != bool(scale_inputs):
        raise ValueError(f"a model with feature_dim {model.config.feature_dim} is saved with "
                         f"{len(scale_inputs or {})} scale inputs; pass scale_inputs exactly when feature_dim > 0")
    if scale_inputs:
        tables = {}
        for name, si in scale_inputs.items():
            tables[f"{name}.codebook"] = si.codebook_KD.float().contiguous().cpu()
            tables[f"{name}.mix"] = si.mix_NN.float().contiguous().cpu()
        starts = json.dumps({name: si.code_start for name, si in scale_inputs.items()})
        with atomic_local_file(out / SCALE_INPUTS_FILE) as tmp:
            save_file(tables, tmp, metadata={"code_start": starts})
    _write_config(out, model.config.to_dict())
    return out


def _write_config(out: Path, model_args: dict) -> None:
    """``config.json``, last: the model's arguments and the size and digest of every other file in the folder."""
    record = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel != CONFIG_FILE and not path.name.startswith("."):
            record[rel] = {"bytes": path.stat().st_size, "digest": digest_file(str(path))}
    storage_for(str(out)).write_text(str(out / CONFIG_FILE), json.dumps(
        {"format": MODEL_FORMAT, "model_args": model_args, "files": record}, indent=2, sort_keys=True))


def seal_model(directory: str | Path) -> None:
    """Record every file now in the model folder (tokenizer copies, ``tokenizers.json`` ...) in its
    ``config.json``, so :func:`verify_files` checks them and a download fetches them."""
    out = Path(directory)
    _write_config(out, json.loads((out / CONFIG_FILE).read_text())["model_args"])


def recorded_files(directory: str | Path) -> list[str]:
    """The files ``config.json`` records (relative paths), or [] for a folder written before the record."""
    try:
        return sorted(json.loads((Path(directory) / CONFIG_FILE).read_text()).get("files") or {})
    except (OSError, ValueError, AttributeError):
        return []


def verify_files(directory: str | Path, *, digests: bool = True, shown_as: str | None = None) -> None:
    """Check the files ``config.json`` records (size, and with ``digests`` their sha256) before they are used.

    Raises a :class:`UserError` naming the first damaged file (``shown_as``: the folder as the user named it,
    e.g. its s3:// URI, when ``directory`` is a local copy). A folder without a record (written before it
    existed) passes unchecked.
    """
    folder = Path(directory)
    try:
        recorded = json.loads((folder / CONFIG_FILE).read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return   # no or unreadable config.json: load_config says so with its own message
    where = (shown_as or str(folder)).rstrip("/")
    for name, record in sorted(recorded.items()):
        path = folder / name
        if not path.exists():
            raise UserError(f"{name} is missing (config.json records {record['bytes']} bytes)",
                            where=where, fix=_DAMAGED_FIX)
        size = path.stat().st_size
        if size != record["bytes"]:
            what = "truncated" if size < record["bytes"] else "longer than written"
            raise UserError(f"{name} is {what}: {size} bytes, config.json records {record['bytes']}",
                            where=where, fix=_DAMAGED_FIX)
        if digests and (actual := digest_file(str(path))) != record["digest"]:
            raise UserError(f"{name} does not match its digest: config.json records {record['digest'][:19]}…, "
                            f"the file hashes to {actual[:19]}…", where=where, fix=_DAMAGED_FIX)


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model config here; is {directory} a folder written by save_model?")
    meta = json.loads(path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: model format {meta.get('format')!r}, this code reads {MODEL_FORMAT}")
    return ModelConfig.from_dict(meta["model_args"])


def load_model(directory: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, weights: str = "raw") -> Transformer:
    """Rebuild the module from ``config.json`` and load ``model.safetensors`` (``weights="raw"``) or the EMA,
    ``ema.safetensors`` (``weights="ema"``), strictly."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights is 'raw' or 'ema', not {weights!r}")
    path = Path(directory) / (EMA_FILE if weights == "ema" else WEIGHTS_FILE)
    if weights == "ema" and not path.exists():
        raise FileNotFoundError(f"{path}: the model has no EMA weights (it was trained without `ema:`)")
    model = model_from_state(load_config(directory), load_file(str(path), device=str(device)))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """The module of ``config`` holding the tensors of ``state`` (no copy), tied weights re-tied."""
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        state = {**state, "head.weight": state["tok_emb.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.head.weight = model.tok_emb.weight
    return model


def load_scale_inputs(directory: str | Path) -> dict[str, ScaleInput]:
    """The model's next-scale inputs by vocabulary name ({} for a model fed parent tokens)."""
    from safetensors import safe_open

    path = Path(directory) / SCALE_INPUTS_FILE
    if not path.exists():
        return {}
    with safe_open(str(path), "pt") as f:
        starts = json.loads(f.metadata()["code_start"])
        return {name: ScaleInput(f.get_tensor(f"{name}.codebook"), f.get_tensor(f"{name}.mix"), int(start))
                for name, start in starts.items()}


def load_vocab(directory: str | Path) -> VocabLayout | None:
    """The model's vocabulary, or None when it was saved without one."""
    path = Path(directory) / VOCAB_FILE
    return VocabLayout.from_json(path.read_text()) if path.exists() else None
