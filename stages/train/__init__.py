"""Stage kind ``train``: an AR generator trained with DeepSpeed ZeRO under Ray Train; output ``model``.

Split by concern (as torchtitan does): ``data`` (stores -> vocabulary, plans,
rows), ``ds_config`` (the generated DeepSpeed config), ``loop`` (what each Ray
Train worker runs), ``weights`` (which weights are saved), ``ema`` (the
moving average of the weights), and this module (checks, the trainer, the
output). The model itself (``stages.models``) imports none of it.

Resumable unit: a checkpoint every ``checkpoint_every`` steps, kept in the
stage folder's ``.arpipe/ray`` (Ray Train's storage, named ``train``); a
rerun of the same fingerprint continues from the latest one, data position
included; a damaged checkpoint is skipped for the newest whole one
(``checkpoints``). The output ``model/`` holds the consolidated fp32 master
weights (``model.safetensors``; under bf16/fp16 DeepSpeed's fp32 copy, not
the half-precision values), with ``ema:`` their EMA (``ema.safetensors``),
``config.json`` (model_args), ``vocab.json`` and
``tokenizers.json`` (which tokenizer made each vocabulary range).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.stage import Output, Stage
from arpipe.pipeline.storage import CONTROL_DIR, control_uri, is_s3, join, pyarrow_s3, storage_for
from arpipe.schemas.train import TrainStage as TrainSpec

if TYPE_CHECKING:
    from arpipe.stages.train.ds_config import ConfigFile


def model_overrides(spec: TrainSpec, vocab_size: int, seq_len: int) -> dict[str, Any]:
    m = spec.model
    args: dict[str, Any] = {"vocab_size": m.vocab_size or vocab_size, "paradigm": m.paradigm,
                            "block_size": m.block_size if m.paradigm == "next_block" else 1,
                            "cond_dropout": m.cond_dropout, "checkpointing": m.activation_checkpointing,
                            "attention": m.attention,
                            "max_seq_len": seq_len}
    args.update({k: v for k, v in (("n_embd", m.n_embd), ("n_layer", m.n_layer), ("n_head", m.n_head)) if v})
    return args


def embed_tokenizers(model_dir: Path, tokenizers: dict[str, dict[str, Any]]) -> None:
    """Copy each tokenizer the model needs into ``model_dir/tokenizers/<name>/`` and write ``tokenizers.json``
    naming the copies, then record every file in ``config.json``: the folder (or its MLflow artifact) works
    after the run folder or bucket is gone."""
    from arpipe.stages.modalities import copy_artifact
    from arpipe.stages.models.io import seal_model

    for name, info in tokenizers.items():
        if info.get("tokenizer_uri"):
            info["path"] = f"tokenizers/{name}"
            copy_artifact(info["tokenizer_uri"], str(model_dir / info["path"]))
    (model_dir / "tokenizers.json").write_text(json.dumps(tokenizers, indent=1, sort_keys=True))
    seal_model(model_dir)


@dataclass
class Start:
    """The model ``init_from`` names, opened in the driver: its folder, config, vocabulary and tokenizers."""

    ref: Any                                  # pipeline.models.ModelRef
    config: Any
    vocab: Any
    tokenizers: dict[str, dict[str, Any]]
    scale_inputs: dict[str, Any]

    @classmethod
    def open(cls, spec: TrainSpec, ctx) -> Start:
        from arpipe.pipeline.models import resolve_model
        from arpipe.stages.models.folder import fetch_model, model_info
        from arpipe.stages.models.io import load_scale_inputs

        ref = resolve_model(spec.init_from, ctx.tracking_uri, where=f"stages.{ctx.name}.init_from")
        folder = fetch_model(ref.location)
        config, vocab, tokenizers = model_info(folder, location=ref.location)
        return cls(ref, config, vocab, tokenizers, load_scale_inputs(folder))

    def weights(self, config, pairs: list[tuple[int, int]], stage: str):
        """The workers' :class:`InitialWeights`, after checking the new model has the starting one's shape."""
        from arpipe.pipeline.models import weights_digest
        from arpipe.stages.train.init import InitialWeights, shape_problem

        problem = shape_problem(self.config.to_dict(), config.to_dict())
        if problem:
            raise UserError(f"init_from {self.ref.uri} does not fit: {problem}", where=f"stages.{stage}.model",
                            fix="give the model block the starting model's shape, or train from scratch")
        return InitialWeights(location=self.ref.location, pairs=tuple(pairs),
                              digest=weights_digest(self.ref.location) or "")


def _shape_against(spec: TrainSpec, start: dict[str, Any]) -> str | None:
    """How the starting model's arguments differ from this stage's model in shape (None: they fit); the
    next-scale input width is only known from the stores, so it is left to the run."""
    from arpipe.stages.models.config import preset
    from arpipe.stages.train.init import shape_problem

    overrides = model_overrides(spec, vocab_size=1 << 16, seq_len=2)
    overrides.pop("max_seq_len")
    wanted = preset(spec.model.preset, **overrides).to_dict()
    wanted.pop("feature_dim", None)
    return shape_problem(start, wanted)


def check_freeze(spec: TrainSpec, config, stage: str) -> list[str]:
    """The parameter names ``freeze`` matches; a pattern that matches none is refused, naming real ones."""
    if not spec.freeze:
        return []
    import fnmatch

    import torch

    from arpipe.stages.models import Transformer

    with torch.device("meta"):
        names = [n for n, _p in Transformer(config).named_parameters()]
    for pattern in spec.freeze:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserError(f"freeze pattern {pattern!r} matches no parameter (they are named like "
                            f"{', '.join(names[:3])}, ...)", where=f"stages.{stage}.freeze",
                            fix="use fnmatch patterns over the model's parameter names")
    matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in spec.freeze)]
    if len(matched) == len(names):
        raise UserError("freeze matches every parameter: nothing would train", where=f"stages.{stage}.freeze",
                        fix="leave some parameters free")
    return matched


def _tokenizer_type(store: str, stages) -> str | None:
    """The ``type`` of the tokenizer that makes ``store`` when it is ``${tokenize_stage.store}`` of this pipeline
    and that stage's tokenizer is ``${tokenizer_stage.tokenizer}``; None when the configs do not say."""
    from arpipe.schemas.base import REF_PATTERN

    ref = REF_PATTERN.fullmatch(store.strip())
    tokenize = stages.get(ref.group(1)) if ref else None
    if tokenize is None or tokenize.kind != "tokenize":
        return None
    ref = REF_PATTERN.fullmatch(tokenize.tokenizer.strip())
    fit = stages.get(ref.group(1)) if ref else None
    return getattr(fit.tokenizer, "type", None) if fit is not None and fit.kind == "tokenizer" else None


def total_steps(spec: TrainSpec, samples: int, seq_len: int) -> int:
    if spec.steps:
        return spec.steps
    if spec.epochs:
        return max(1, math.ceil(spec.epochs * samples / spec.global_batch))
    return max(1, math.ceil(spec.tokens / (spec.global_batch * seq_len)))


def _ray_storage(out_uri: str) -> tuple[str, Any]:
    """Where Ray Train keeps checkpoints: the stage folder's control area (never part of the output).

    On S3 the filesystem comes from arpipe's one AWS session (:func:`pyarrow_s3`): the same keys, session
    token, region and endpoint as every other S3 access; built here, once per stage run.
    """
    if not is_s3(out_uri):
        return control_uri(out_uri, "ray"), None
    return control_uri(out_uri, "ray")[len("s3://"):], pyarrow_s3()


SNAPSHOT = "train/checkpoint_manager_snapshot.json"


def _set_aside_torn_snapshot(storage_path: str, filesystem, stage: str) -> None:
    """Ray Train rewrites its checkpoint manager's snapshot in place: a kill -9 during that write leaves it
    empty or cut, and every later run of the stage then fails in Ray's CheckpointManagerInitializationError.
    Such a snapshot is renamed aside (training starts again from step 0, which gives the same model) and
    the log says so."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    path = f"{storage_path.rstrip('/')}/{SNAPSHOT}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        json.loads(data)
        return
    except ValueError:
        fs.move(path, path + ".torn")
    print(f"[{stage}] Ray Train's checkpoint record {path} was cut by a kill ({len(data)} bytes); set aside as "
          f"{SNAPSHOT.rsplit('/', 1)[1]}.torn: training starts again from step 0", flush=True)


class TrainStage(Stage):
    kind = "train"
    version = "1"
    placement = "driver"   # it starts a Ray Train worker group
    #: output files the cache re-hashes before trusting them (pipeline/outputs.py): the weights are read whole
    #: by every user of the model anyway, and a changed byte must cost a rerun, not a wrong or failing sample
    rehash_outputs = ("model/*.safetensors",)
    spec: TrainSpec

    @classmethod
    def check(cls, spec: TrainSpec) -> str | None:
        """The model shape, checked before Ray starts (the vocabulary is known only from the stores)."""
        from arpipe.stages.models.config import preset

        try:
            overrides = model_overrides(spec, vocab_size=spec.model.vocab_size or 1 << 16, seq_len=spec.seq_len or 2)
            overrides.pop("max_seq_len")
            preset(spec.model.preset, **overrides).validate(seq_len=spec.seq_len)
        except ValueError as err:
            return f"model: {err}"
        return None

    @classmethod
    def check_across(cls, spec: TrainSpec, stages) -> str | None:
        """next_level needs octree tokens: a store this pipeline tokenizes with another tokenizer type is refused
        before anything runs (a store from elsewhere is checked when the stage reads its layout)."""
        if spec.model.paradigm != "next_level":
            return None
        stores = [(f"data[{k}].store", d.store) for k, d in enumerate(spec.data)]
        for field, uri in stores + ([("heldout", spec.heldout)] if spec.heldout else []):
            kind = _tokenizer_type(uri, stages)
            if kind is not None and kind != "octree":
                return (f"{field}: paradigm next_level predicts octree tokens level by level, but {uri} holds "
                        f"{kind} tokens; tokenize point clouds with `tokenizer: {{type: octree}}`, or use "
                        "paradigm next_token")
        return None

    @staticmethod
    def _init_from_part(spec: TrainSpec, pipeline_dir: Path) -> str | None:
        """Of the weights ``init_from`` names (a changed starting point reruns the stage), checked against this
        stage's model shape. A reference to an upstream stage is in the fingerprint by its content digest, and
        checked at run."""
        from arpipe.pipeline.models import is_model_uri, resolve_model, weights_digest
        from arpipe.pipeline.storage import normalize
        from arpipe.schemas.base import REF_PATTERN

        if not spec.init_from or REF_PATTERN.search(spec.init_from):
            return None
        where = "init_from"
        uri = spec.init_from if is_model_uri(spec.init_from) else normalize(spec.init_from, pipeline_dir)
        ref = resolve_model(uri, where=where)
        digest = weights_digest(ref.location)
        if digest is None:
            raise UserError("no model here (config.json with a weights record is missing)", where=spec.init_from,
                            fix="give init_from a train stage's model folder or a models:/ URI")
        start = json.loads(storage_for(ref.location).read_text(join(ref.location, "config.json")))["model_args"]
        problem = _shape_against(spec, start)
        if problem:
            raise UserError(f"init_from {spec.init_from} does not fit this stage's model: {problem}",
                            where=spec.init_from, fix="give the model block the starting model's shape "
                            "(n_embd, n_layer, n_head, paradigm), or train from scratch")
        return f"init_from {ref.key} {digest}"

    @classmethod
    def code_digest(cls, spec: TrainSpec, pipeline_dir: Path) -> str | None:
        """Of the ds_config file's content and of the weights ``init_from`` names (a changed file or starting
        point reruns the stage). Both are read and checked against the stage's fields here, so `validate`,
        `plan` and `run` refuse a broken file or a model that does not fit before Ray starts."""
        from arpipe.pipeline.digest import digest_bytes
        from arpipe.stages.train.ds_config import check_config_file

        parts = []
        ds_file = check_config_file(spec, pipeline_dir)
        if ds_file is not None:
            parts.append(f"deepspeed.config_file {ds_file.digest}")
        if (start := cls._init_from_part(spec, pipeline_dir)) is not None:
            parts.append(start)
        return digest_bytes("\n".join(parts).encode()) if parts else None

    def _config_file(self) -> ConfigFile | None:
        """The ds_config file, as the plan fingerprinted it: one edited since is refused, never trained on
        under the old fingerprint."""
        from arpipe.stages.train.ds_config import read_config_file

        spec, ctx = self.spec, self.ctx
        if not spec.deepspeed.config_file:
            return None
        if ctx.code_digest and type(self).code_digest(spec, ctx.pipeline_dir) != ctx.code_digest:
            raise UserError("changed since this run planned the stage", where=spec.deepspeed.config_file,
                            fix="run again: the stage's fingerprint follows the file's content")
        return read_config_file(spec.deepspeed.config_file, ctx.pipeline_dir)

    def run(self) -> dict[str, Output]:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from arpipe.stages.models import ObjectiveMix, ScaleInput, count_parameters, preset
        from arpipe.stages.train.checkpoints import damage
        from arpipe.stages.train.config import TrainLoopConfig
        from arpipe.stages.train.data import (
            build_vocab,
            control_tokenizer,
            default_seq_len,
            scale_inputs,
            summarize_store,
            text_tokenizer,
        )
        from arpipe.stages.train.ds_config import build_ds_config
        from arpipe.stages.train.init import grow_vocab, new_rows
        from arpipe.stages.train.loop import train_loop
        from arpipe.stages.train.weights import finish_model

        spec, ctx = self.spec, self.ctx
        ds_file = self._config_file()
        summaries = [summarize_store(d.store) for d in spec.data]
        heldout = summarize_store(spec.heldout) if spec.heldout else None
        start = Start.open(spec, ctx) if spec.init_from else None
        if start is not None:
            vocab, names, kept, pairs = grow_vocab(start.vocab, start.tokenizers, summaries, heldout)
        else:
            (vocab, names), kept, pairs = build_vocab(summaries, heldout), {}, []
        seq_len = spec.seq_len or default_seq_len(summaries, vocab)
        inputs = scale_inputs(summaries, names, vocab) if spec.model.paradigm == "next_scale" else {}
        if start is not None and inputs:   # the kept ranges' VAR inputs, moved to where their codes are now
            inputs.update({n: ScaleInput(si.codebook_KD, si.mix_NN, vocab.code_range(n)[0])
                           for n, si in start.scale_inputs.items() if n in kept})
        feature_dim = max((si.feature_dim for si in inputs.values()), default=0)
        inputs = {n: si.padded(feature_dim) for n, si in inputs.items()}
        try:
            config = preset(spec.model.preset, **model_overrides(spec, vocab.vocab_size, seq_len),
                            feature_dim=feature_dim).validate(max_token=vocab.vocab_size - 1, seq_len=seq_len)
        except ValueError as err:
            raise UserError(f"model config: {err}", where=f"stages.{ctx.name}.model",
                            fix="adjust the model block of this stage") from None
        init = start.weights(config, pairs, ctx.name) if start is not None else None
        frozen = check_freeze(spec, config, ctx.name)
        if start is not None:
            grown = new_rows(vocab, pairs)
            print(f"[{ctx.name}] starting from {spec.init_from}: {len(pairs)} of {vocab.vocab_size} vocabulary rows "
                  f"kept" + (f"; new rows: {'; '.join(grown)}" if grown else ""), flush=True)
        if frozen:
            print(f"[{ctx.name}] frozen: {len(frozen)} parameters ({', '.join(frozen[:6])}"
                  f"{', ...' if len(frozen) > 6 else ''})", flush=True)
        steps = total_steps(spec, sum(s.samples for s in summaries), seq_len)
        storage_path, filesystem = _ray_storage(ctx.out_uri)
        cfg = TrainLoopConfig(
            env=ctx.forwarded_env(), seed=spec.seed, vocab=vocab, model=config, summaries=tuple(summaries),
            names=tuple(names), weights=tuple(d.weight for d in spec.data), seq_len=seq_len, packing=spec.packing,
            group_by_length=spec.group_by_length,
            ds_config=build_ds_config(spec, steps, ds_file), total_steps=steps, grad_accum=spec.grad_accum,
            micro_batch=spec.micro, log_every=spec.log_every, print_every=spec.print_every, eval_every=spec.eval_every,
            checkpoint_every=spec.checkpoint_every, tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id,
            n_params=count_parameters(config), scale_inputs=inputs,
            heldout=heldout, heldout_name=names[0], stage=ctx.name, init=init, freeze=tuple(spec.freeze),
            ema=spec.ema, objective=ObjectiveMix(**spec.objective.model_dump()) if spec.objective else None,
            compile=spec.compile)
        print(f"[{ctx.name}] {config.paradigm} model, {count_parameters(config) / 1e6:.2f}M parameters, vocab "
              f"{config.vocab_size}, seq_len {seq_len}; {steps} steps of {spec.global_batch} sequences on "
              f"{spec.workers} worker(s), ZeRO-{spec.deepspeed.zero_stage} {spec.deepspeed.precision}", flush=True)
        ctx.log_metrics({"parameters": count_parameters(config), "total_steps": steps})
        _set_aside_torn_snapshot(storage_path, filesystem, ctx.name)
        trainer = TorchTrainer(
            train_loop, train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                         resources_per_worker={"CPU": 1, **({"GPU": 1} if spec.use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
            run_config=RunConfig(storage_path=storage_path, storage_filesystem=filesystem, name="train",
                                 failure_config=FailureConfig(max_failures=spec.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        model_dir = ctx.work_dir / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        with result.checkpoint.as_directory() as folder:
            problem = damage(Path(folder))
            if problem is not None:   # damaged after the workers checked it: never hand it on as the model
                raise RuntimeError(f"the final checkpoint ({result.checkpoint.path}) is damaged ({problem}); "
                                   "rerun to train from the last whole checkpoint")
            # the fp32 master weights (from DeepSpeed's partitions under bf16/fp16) and the EMA, merged
            finish_model(Path(folder), model_dir, config=config, vocab=vocab, scale_inputs=inputs)
        tokenizers = {name: {"modality": s.modality, "tokenizer_uri": s.tokenizer_uri,
                             "tokenizer_digest": s.tokenizer_digest, "layout": s.layout, "store": s.uri,
                             "classes": s.labels}
                      for name, s in zip(names, summaries)}
        text, control = text_tokenizer(summaries), control_tokenizer(summaries)
        if text:   # the prompt streams' tokenizers: sample encodes prompts and controls with them
            tokenizers["text"] = {"modality": "text", "prompt": True, "tokenizer_uri": text["uri"],
                                  "tokenizer_digest": text["digest"]}
        if control:
            tokenizers["control"] = {"modality": "image", "prompt": True, "tokenizer_uri": control["uri"],
                                     "tokenizer_digest": control["digest"], "transform": control["transform"],
                                     "sigma": control["sigma"]}
        if start is not None:   # the starting model's ranges no store trained stay drawable
            carried = {**kept, **{n: i for n, i in start.tokenizers.items() if i.get("prompt") and n not in tokenizers}}
            tokenizers.update({n: {k: v for k, v in info.items() if k not in ("path", "trained_with")}
                               for n, info in carried.items()})
        embed_tokenizers(model_dir, tokenizers)
        model_id = self._log_model(model_dir, config)
        if spec.registration:
            version = ctx.run_log.register_model(model_id, spec.registration.name, spec.registration.alias)
            if version:
                named = f"models:/{spec.registration.name}/{version}" + (
                    f", models:/{spec.registration.name}@{spec.registration.alias}" if spec.registration.alias else "")
                print(f"[{ctx.name}] registered as {spec.registration.name} version {version} ({named})", flush=True)
        self._report_progress(steps)
        return {"model": Output(path="model")}

    def _report_progress(self, steps: int) -> None:
        """The per-segment held-out diagnostics as an MLflow table and plot, and one warning line when the
        loss was still falling steeply at the end (the budget was too short) or rising (memorizing)."""
        run = self.ctx.run_log
        if not run.enabled:
            return
        name = self.ctx.name
        logged = run.metrics()
        keys = sorted(k for k in logged if k.startswith("heldout/"))
        rows: dict[tuple[int, str], dict[str, Any]] = {}
        for key in keys:
            _, segment, metric = key.split("/")
            for step, value in run.metric_history(key):
                rows.setdefault((step, segment), {"step": step, "segment": segment})[metric] = value
        if rows:
            from arpipe.stages.evaluation.plots import segment_curves

            table = sorted(rows.values(), key=lambda r: (r["step"], len(r["segment"]), r["segment"]))
            run.log_table({c: [r.get(c) for r in table] for c in ("step", "segment", "loss", "accuracy")},
                          artifact_file="diagnostics/heldout_by_segment.json")
            png = self.ctx.work_dir / CONTROL_DIR / "heldout_by_segment.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            segment_curves(table, png, title=f"{name}: teacher-forced held-out loss and accuracy per segment")
            self.ctx.log_artifact(png, "diagnostics")
            last = max(r["step"] for r in table)
            print(f"[{name}] held-out at step {last}: " + ", ".join(
                f"{r['segment']} {r['loss']:.2f} nats {100 * r['accuracy']:.0f}%" for r in table
                if r["step"] == last and "loss" in r), flush=True)
        key = "heldout_loss" if "heldout_loss" in logged else "loss"
        history = run.metric_history(key)
        verdict = convergence(history, steps)
        if verdict:
            print(f"[{name}] warning: {'held-out' if key == 'heldout_loss' else 'training'} loss {verdict}",
                  flush=True)
            self.ctx.log_metrics({"converged": 0.0})

    def _log_model(self, model_dir: Path, config) -> str | None:
        """The trained generator as an MLflow logged model, linked to this stage's run; returns its id."""
        return self.ctx.run_log.log_model(
            model_dir, name=self.ctx.name, params={k: str(v) for k, v in config.to_dict().items()},
            tags={"arpipe.stage": self.ctx.name, "arpipe.fingerprint": self.ctx.fingerprint}, model_type="arpipe-ar")


def convergence(history: list[tuple[int, float]], steps: int, *, window: float = 0.25,
                threshold: float = 0.03) -> str | None:
    """What to tell the user when the loss over the last ``window`` of the steps still fell by more than
    ``threshold`` (relative) or rose by as much; None when it flattened. Noisy training losses are compared
    as means over a tenth of the steps; sparse held-out evaluations as a rate scaled to the window."""
    if len(history) < 3 or steps < 10:
        return None
    history = sorted(history)
    span = max(1, steps // 10) if len(history) > 20 else 0

    def level(at: int) -> tuple[int, float] | None:
        """(step, loss) at ``at``: the mean over the span before it, else the last value at or before it."""
        near = [(s, v) for s, v in history if at - span <= s <= at] or [(s, v) for s, v in history if s <= at][-1:]
        return (near[-1][0], sum(v for _, v in near) / len(near)) if near else None

    end = history[-1][0]
    first, last = level(int(end - window * steps)), level(end)
    if first is None or last is None or first[1] <= 0 or last[0] <= first[0]:
        return None
    (at, before), after = first, last[1]
    # sparse evaluations: the change over the steps between the two points, scaled to the window
    change = (before - after) / before * (window * steps) / (last[0] - at)
    if change > threshold:
        return (f"was still falling at the end ({before:.3f} at step {at} -> {after:.3f} at step {last[0]}, "
                f"{100 * change:.1f}% per {100 * window:.0f}% of the steps): the model is still learning; raise "
                f"steps (e.g. steps: {2 * steps}); docs/training.md, sizing a budget")
    if change < -threshold:
        return (f"rose at the end ({before:.3f} at step {at} -> {after:.3f} at step {last[0]}, "
                f"{100 * -change:.1f}% per {100 * window:.0f}% of the steps): the model is memorizing its data; "
                "use fewer steps or more data")
    return None
