"""A trained model folder: fetch it to local disk, read its config/vocab/tokenizers, build the sampling Plan.

A train stage writes ``config.json``, ``model.safetensors``, ``vocab.json``,
``tokenizers.json`` (which tokenizer made each modality's codes) and, for
models trained on VAR's accumulated input, ``scale_inputs.safetensors``;
with ``ema:``, also ``ema.safetensors`` (the EMA of the weights, which
:func:`open_model` loads by default when the folder has it).
Everything that reads such a folder (the sample and evaluate stages, the
Python API) opens it here::

    model = open_model("./runs/train/0123abcd/model")      # local or s3://
    plan = model.plan("image", length=None)                # next-group Plan for that modality
    out = generate(model.model, plan, Prompt.from_vocab(model.vocab, "image", labels), SamplingOptions(), seed=0,
                   sample_indices=range(8))
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arpipe.pipeline.digest import digest_bytes, hex_of
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import is_s3, join, storage_for

MODEL_FILES = ("config.json", "model.safetensors", "vocab.json", "tokenizers.json", "scale_inputs.safetensors",
               "ema.safetensors")
_NO_MODEL_FIX = "point `model` at a train stage's output, e.g. ${train.model}"


def fetch_model(uri: str, *, digests: bool = True) -> Path:
    """A local folder holding the model folder at ``uri`` (downloaded once per machine for S3), checked
    against the sizes and (with ``digests``) the digests its ``config.json`` records: a damaged file is refused
    with one line naming it before anything loads it."""
    from .io import verify_files

    if not is_s3(uri):
        path = Path(uri)
        if not (path / "config.json").exists():
            raise UserError("no model here (config.json is missing)", where=uri, fix=_NO_MODEL_FIX)
        verify_files(path, digests=digests)
        return path
    local = Path(tempfile.gettempdir()) / "arpipe-models" / hex_of(digest_bytes(uri.encode()))[:16]
    local.mkdir(parents=True, exist_ok=True)
    _download(uri, local)
    try:
        verify_files(local, digests=digests, shown_as=uri)
    except UserError:
        # the local copy may be stale (the model was rewritten since) or damaged: fetch it afresh, once
        shutil.rmtree(local)
        local.mkdir(parents=True)
        _download(uri, local)
        verify_files(local, digests=digests, shown_as=uri)
    return local


def _download(uri: str, local: Path) -> None:
    """The model folder's files not yet in ``local``, each fetched atomically (a temp file renamed into place)."""
    from .io import recorded_files

    storage = storage_for(uri)
    if not (local / "config.json").exists():
        if not storage.exists(join(uri, "config.json")):
            raise UserError("no model here (config.json is missing)", where=uri, fix=_NO_MODEL_FIX)
        storage.get_file(join(uri, "config.json"), local / "config.json")
    # the recorded files, and the known names (a folder written before the record, or a file added by hand)
    for name in sorted(set(recorded_files(local)) | set(MODEL_FILES)):
        if not (local / name).exists() and storage.exists(join(uri, name)):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            storage.get_file(join(uri, name), local / name)


def model_info(folder: Path, *, check_weights: bool = True,
               location: str | None = None) -> tuple[Any, Any, dict[str, dict[str, Any]]]:
    """``(ModelConfig, VocabLayout, tokenizers)`` of a model folder, checked: every file parses (the weights'
    header too, unless ``check_weights`` is off because the caller loads them next).

    A model folder carries a copy of each tokenizer it needs (``tokenizers/<name>/``, named by ``path`` in
    ``tokenizers.json``): each entry's ``tokenizer_uri`` then names that copy, below ``location`` (where the
    folder lives for others, e.g. its s3:// URI; default the local ``folder``), so the model works after the
    run that trained it is gone; ``trained_with`` keeps the artifact it was trained with."""
    from safetensors import safe_open

    from .io import WEIGHTS_FILE, load_config, load_vocab

    fix = "point `model` at a folder a train stage wrote (model.safetensors, config.json, vocab.json)"
    for name, load in (("config.json", load_config), ("vocab.json", load_vocab)):
        try:
            loaded = load(folder)
        except (ValueError, KeyError, TypeError) as err:   # json.JSONDecodeError is a ValueError
            raise UserError(f"{name} does not hold a model {name[:-5]} ({err})", where=str(folder / name),
                            fix=fix) from None
        if name == "config.json":
            config = loaded
        else:
            vocab = loaded
    if vocab is None:
        raise UserError("the model has no vocab.json", where=str(folder),
                        fix="sample models written by a train stage (they carry their vocabulary)")
    weights = folder / WEIGHTS_FILE
    if check_weights:
        try:
            with safe_open(str(weights), "pt") as f:   # reads the header and checks it against the file size
                for key in f.keys():
                    f.get_slice(key)
        except Exception as err:   # safetensors raises its own SafetensorError, OSError or ValueError
            raise UserError(f"{WEIGHTS_FILE} is not a complete safetensors file ({err})", where=str(weights),
                            fix=fix + "; weights are never read from pickles") from None
    path = folder / "tokenizers.json"
    try:
        tokenizers = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as err:
        raise UserError(f"tokenizers.json does not parse ({err})", where=str(path), fix=fix) from None
    for info in tokenizers.values():
        if info.get("path"):
            info["trained_with"] = info.get("tokenizer_uri")
            info["tokenizer_uri"] = join(location, info["path"]) if location else str(folder / info["path"])
    return config, vocab, tokenizers


def vocab_name_of_store(tokenizers: dict[str, dict[str, Any]], store, uri: str) -> str:
    """The model's vocabulary name for a token store: the range its tokenizer's codes were trained in."""
    digest = store.manifest.tokenizer.digest if store.manifest.tokenizer else None
    names = [n for n, t in tokenizers.items() if t.get("tokenizer_digest") == digest]
    if not names:
        raise UserError("this token store was made by a tokenizer the model was not trained on", where=uri,
                        fix="use a store tokenized like the model's training data")
    return names[0]


def plan_for_modality(config, layout: dict[str, Any], length: int | None, scale_input=None):
    """The decoding plan of one modality, as the trainer laid its documents out (with the model's
    ``ScaleInput`` for that modality when it was trained on VAR's accumulated input); for ``next_level`` the
    octree's :class:`~.levels.OctreePlan` (a plan per tree, at most ``length`` tokens); for a layout of
    several sizes (flexvq), the plan of ``length`` tokens (one size's), else of the largest."""
    from .sequence import make_plan, plan_from_layout

    if config.paradigm == "next_level":
        from .levels import OctreePlan

        return OctreePlan.for_layout(layout, int(length), n_axes=config.rope_axes)
    if layout.get("scales") or layout.get("grid"):
        plan = plan_from_layout(config.paradigm, layout, block_size=config.block_size, n_axes=config.rope_axes)
        plan = plan.with_scale_input(scale_input)
        # flexvq: a size's tokens are the first scales (``length``: that size's)
        return plan.prefix(int(length)) if layout.get("sizes") and length else plan
    return make_plan(config.paradigm, n_tokens=int(length),
                     block_size=config.block_size if config.paradigm == "next_block" else 1,
                     n_axes=config.rope_axes)


@dataclass
class ModelFolder:
    """A trained model, loaded: its config, vocabulary, tokenizers (by vocabulary name), scale inputs and weights."""

    uri: str
    folder: Path                                   # local (a download cache for s3://)
    config: Any                                    # ModelConfig
    vocab: Any                                     # VocabLayout
    tokenizers: dict[str, dict[str, Any]]          # name -> {modality, tokenizer_uri, tokenizer_digest, layout, ...}
    model: Any                                     # Transformer, in eval mode
    scale_inputs: dict[str, Any] = field(default_factory=dict)   # name -> ScaleInput (VAR's accumulated input)
    weights: str = "raw"                           # which weights ``model`` holds: "raw" or "ema"

    def plan(self, name: str, length: int | None = None):
        """The decoding plan for vocabulary ``name`` (``length`` only for variable-length token layouts)."""
        if name not in self.tokenizers:
            raise UserError(f"the model has no modality {name!r} ({', '.join(self.tokenizers) or 'none'})",
                            where=self.uri, fix="name one of the model's modalities")
        layout = dict(self.tokenizers[name].get("layout") or {})
        return plan_for_modality(self.config, layout, length, self.scale_inputs.get(name))


def choose_weights(folder: Path, requested: str | None, *, where: str) -> str:
    """Which weights of the model folder to use: ``requested`` ("ema" or "raw"), or for None the EMA when the
    folder has it, else the raw weights. Asking for the EMA of a model trained without one is a UserError."""
    from .io import EMA_FILE

    has_ema = (Path(folder) / EMA_FILE).exists()
    if requested not in (None, "ema", "raw"):
        raise UserError(f"weights must be ema or raw, not {requested!r}", where=where,
                        fix="pick `ema` (the EMA weights) or `raw` (the trained weights)")
    if requested == "ema" and not has_ema:
        raise UserError("weights: ema, but the model has no EMA weights (it was trained without `ema:`)",
                        where=where, fix="use `weights: raw`, or train the model with `ema: {decay: 0.999}`")
    return requested or ("ema" if has_ema else "raw")


def open_model(uri: str, *, device: str = "cpu", dtype=None, check_weights: bool = True,
               weights: str | None = None) -> ModelFolder:
    """Fetch, check and load the model folder at ``uri`` (local or s3://) onto ``device``, with its EMA weights
    or its raw ones (``weights``; None: the EMA when the folder has it)."""
    from .io import load_model, load_scale_inputs

    folder = fetch_model(uri, digests=check_weights)
    config, vocab, tokenizers = model_info(folder, check_weights=check_weights, location=uri)
    chosen = choose_weights(folder, weights, where=uri)
    model = load_model(folder, device=device, dtype=dtype, weights=chosen)
    return ModelFolder(uri=uri, folder=folder, config=config, vocab=vocab, tokenizers=tokenizers, model=model,
                       scale_inputs=load_scale_inputs(folder), weights=chosen)
