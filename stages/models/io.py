"""Saving and loading models as safetensors + JSON: no pickle anywhere.

A model folder holds ``model.safetensors`` (weights), ``config.json``
(``{"format", "model_args"}``, enough to rebuild the module) and, when given,
``vocab.json`` (the :class:`~stages.models.vocab.VocabLayout` that maps the
model's ids to modalities). Every file is written to a temporary name and
renamed, so a crash never leaves a half-written model that loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .transformer import Transformer
from .vocab import VocabLayout

MODEL_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


def save_model(directory: str | Path, model: Transformer, *, vocab: VocabLayout | None = None) -> Path:
    """Write the model folder; tied weights are stored once and re-tied on load."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("head.weight", None)
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": str(MODEL_FORMAT)}))
    if vocab is not None:
        _write_text(out / VOCAB_FILE, json.dumps(vocab.to_dict(), indent=2, sort_keys=True))
    _write_text(out / CONFIG_FILE, json.dumps({"format": MODEL_FORMAT, "model_args": model.config.to_dict()},
                                              indent=2, sort_keys=True))
    return out


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model config here; is {directory} a folder written by save_model?")
    meta = json.loads(path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: model format {meta.get('format')!r}, this code reads {MODEL_FORMAT}")
    return ModelConfig.from_dict(meta["model_args"])


def load_model(directory: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """Rebuild the module from ``config.json`` and load ``model.safetensors`` strictly."""
    config = load_config(directory)
    with torch.device("meta"):
        model = Transformer(config)
    state = load_file(str(Path(directory) / WEIGHTS_FILE), device=str(device))
    if config.tie_embeddings:
        state["head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.head.weight = model.tok_emb.weight
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_vocab(directory: str | Path) -> VocabLayout | None:
    """The model's vocabulary, or None when it was saved without one."""
    path = Path(directory) / VOCAB_FILE
    return VocabLayout.from_json(path.read_text()) if path.exists() else None
