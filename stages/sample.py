"""Stage kind ``sample``: draw samples from a trained model on a Ray actor pool; outputs ``samples`` and ``media``.

Each actor holds one model replica (``actors``, with ``cpus_per_actor`` /
``gpus_per_actor``) and decodes whole *sample shards*: ``samples_per_shard``
consecutive samples of one modality. A shard is the resumable unit: the
actor writes its token-store shard, then the media files of its samples,
then a record ``.arpipe/units/<shard>.json`` last; a rerun reuses every shard
whose record and files are in place, so a crash costs at most the shards in
flight.

Sample ``i`` draws from a generator seeded by ``(seed, i)`` (see
``stages.models.sampling``), so its tokens do not depend on its shard, batch
or actor, and any sample can be redrawn alone. Decoding follows the model's
paradigm (one forward per token, block or scale), with a KV cache, CFG
(constant or linear ramp) and, for next-token models, optional speculative
Jacobi decoding (``decoder: sjd``).

Outputs: ``samples/`` is a token store (tokenizer-local codes, one
``condition`` per sample, the sampling config in its metadata) and
``media/<modality>/<key>.<ext>`` the decoded files plus
``media/contact_<modality>.png``, which is also logged to MLflow. A sample
whose tokens do not decode (an octree that never closes) is quarantined in
``rejects.arrow`` with its reason and seed index.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.stage import Output, Stage
from arpipe.pipeline.storage import is_s3, join, storage_for
from arpipe.schemas.sample import SampleStage as SampleSpec

CONTACT_SAMPLES = 64
MODEL_FILES = ("config.json", "model.safetensors", "vocab.json", "tokenizers.json", "scale_inputs.safetensors")


def fetch_model(uri: str) -> Path:
    """A local folder holding the model folder at ``uri`` (downloaded once per process for S3)."""
    if not is_s3(uri):
        path = Path(uri)
        if not (path / "config.json").exists():
            raise UserError("no model here (config.json is missing)", where=uri,
                            fix="point `model` at a train stage's output, e.g. ${train.model}")
        return path
    local = Path(tempfile.gettempdir()) / "arpipe-models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    storage = storage_for(uri)
    for name in MODEL_FILES:
        if not (local / name).exists() and storage.exists(join(uri, name)):
            tmp = local / f".{name}.{os.getpid()}.tmp"
            storage.get_file(join(uri, name), tmp)
            os.replace(tmp, local / name)
    if not (local / "config.json").exists():
        raise UserError("no model here (config.json is missing)", where=uri,
                        fix="point `model` at a train stage's output, e.g. ${train.model}")
    return local


def model_info(folder: Path, *, check_weights: bool = True) -> tuple[Any, Any, dict[str, dict[str, Any]]]:
    """``(ModelConfig, VocabLayout, tokenizers)`` of a model folder, checked: every file parses (the weights'
    header too, unless ``check_weights`` is off because the caller loads them next)."""
    from safetensors import safe_open

    from arpipe.stages.models import load_vocab
    from arpipe.stages.models.io import WEIGHTS_FILE, load_config

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
    ``ScaleInput`` for that modality when it was trained on VAR's accumulated input)."""
    from arpipe.stages.models import make_plan, plan_from_layout

    if layout.get("scales") or layout.get("grid"):
        plan = plan_from_layout(config.paradigm, layout, block_size=config.block_size, n_axes=config.rope_axes)
        return plan.with_scale_input(scale_input)
    return make_plan(config.paradigm, n_tokens=int(length),
                     block_size=config.block_size if config.paradigm == "next_block" else 1,
                     n_axes=config.rope_axes)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class SampleWorker:
    """One model replica in a Ray actor; decodes shards into the stage folder."""

    def __init__(self, model_uri: str, env: dict[str, str], device: str, precision: str):
        import torch

        from arpipe.stages.models import load_model, load_scale_inputs

        os.environ.update(env)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.folder = fetch_model(model_uri)
        self.config, self.vocab, self.tokenizers = model_info(self.folder, check_weights=False)  # driver checked
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device != "cpu" else None
        self.model = load_model(self.folder, device=device, dtype=dtype)
        self.scale_inputs = load_scale_inputs(self.folder)
        self._loaded: dict[str, Any] = {}

    def tokenizer(self, name: str):
        if name not in self._loaded:
            from arpipe.stages.modalities import load_tokenizer

            self._loaded[name] = load_tokenizer(self.tokenizers[name]["tokenizer_uri"])
        return self._loaded[name]

    def run_shard(self, job: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from arpipe.stages import media
        from arpipe.stages.modalities import TokenizerError
        from arpipe.stages.models import Prompt, SamplingOptions, generate, generate_sjd
        from arpipe.stages.store import ShardWriter, TokenStore

        started = time.time()
        name, modality = job["name"], job["modality"]
        tok = self.tokenizer(name)
        plan = plan_for_modality(self.config, job["layout"], job["length"], self.scale_inputs.get(name))
        options = SamplingOptions(**job["options"])
        grid = tuple(job["layout"]["grid"]) if "grid" in job["layout"] and "scales" not in job["layout"] else None
        prefix_store = TokenStore.open(job["prefix"]["store"]) if job["prefix"] else None
        out_storage = storage_for(job["out_uri"])
        media_files: dict[str, list] = {}
        rejects: list[dict[str, Any]] = []
        passes = tokens = 0
        writer = ShardWriter(job["store_uri"], job["shard"], vocab_size=job["store_vocab"])
        n, B = len(job["indices"]), job["batch_size"]
        for a in range(0, n, B):
            indices, labels = job["indices"][a:a + B], job["labels"][a:a + B]
            prefix = None
            if prefix_store is not None:
                import torch

                M = job["prefix"]["tokens"]
                prefix = torch.stack([torch.from_numpy(prefix_store.tokens(int(s)).reshape(-1)[:M].astype(np.int64))
                                      for s in job["prefix"]["ids"][a:a + B]])
            prompt = Prompt.from_vocab(self.vocab, name, labels, prefix)
            if job["decoder"] == "sjd":
                gen = generate_sjd(self.model, plan, prompt, options, seed=job["seed"], sample_indices=indices,
                                   window=job["window"])
            else:
                gen = generate(self.model, plan, prompt, options, seed=job["seed"], sample_indices=indices)
            passes += gen.forward_passes
            local = self.vocab.to_local(name, gen.tokens.cpu()).numpy()
            for k, i in enumerate(indices):
                key = f"{name}-{i:06d}"
                idx = local[k]
                try:
                    if hasattr(tok, "trim"):
                        idx = tok.trim(idx)
                    decoded = tok.decode_arrays([idx])[0]
                except (TokenizerError, ValueError) as err:
                    rejects.append({"source": f"{key} (seed {job['seed']}, index {i})",
                                    "reason": f"tokens do not decode: {err}"})
                    continue
                if grid is not None and int(np.prod(grid)) == idx.size:
                    idx = idx.reshape(grid)
                writer.append(idx, key=key, modality=modality, condition=labels[k],
                              source_uri=job["prefix"]["store"] if job["prefix"] else None)
                tokens += int(idx.size)
                for fmt in job["formats"]:
                    data = media.encode(decoded, fmt)
                    rel = f"media/{name}/{key}{media.EXTENSIONS[fmt]}"
                    out_storage.write_bytes(join(job["out_uri"], rel), data, durable=False)
                    media_files[rel] = [len(data), _digest(data)]
        writer.commit()
        record = {"shard": job["shard"], "name": name, "samples": writer.samples, "tokens": tokens,
                  "forward_passes": passes, "media": media_files, "rejects": rejects,
                  "seconds": time.time() - started}
        out_storage.write_text(job["record_uri"], json.dumps(record))
        return record


class SampleStage(Stage):
    kind = "sample"
    version = "1"
    placement = "driver"   # it runs its own actor pool
    spec: SampleSpec

    def _labels(self, vocab, trained: list[str] | None, n: int, name: str) -> list[Any]:
        """One label per sample; ``trained`` are the classes this modality's data had (None: unknown)."""
        spec, where = self.spec, f"stages.{self.ctx.name}.classes"
        known = list(vocab.classes) if trained is None else list(trained)
        if isinstance(spec.classes, dict):
            labels = []
            for label, count in spec.classes.items():
                if str(label) not in known:
                    raise UserError(f"class {label!r} is not one the model knows for {name} "
                                    f"({', '.join(known[:12]) or 'none'})", where=where,
                                    fix="use a class of the training data (and `modalities` to pick the modality)")
                labels += [str(label)] * count
            return labels
        if spec.classes == "all" and not known:
            raise UserError("classes: all, but the model was trained without classes", where=where,
                            fix="remove `classes`")
        if known and spec.classes != "none":
            return [known[i % len(known)] for i in range(n)]
        return [None] * n

    def _jobs(self, config, vocab, tokenizers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        from arpipe.stages.models import SamplingOptions

        spec, ctx = self.spec, self.ctx
        names = spec.modalities or [n for n, _ in vocab.modalities]
        where = f"stages.{ctx.name}"
        for name in names:
            if name not in dict(vocab.modalities):
                raise UserError(f"modality {name!r} is not in the model's vocabulary "
                                f"({', '.join(n for n, _ in vocab.modalities)})", where=f"{where}.modalities",
                                fix="name one of the model's modalities")
            if name not in tokenizers:
                raise UserError(f"the model folder does not say which tokenizer made {name!r} (tokenizers.json)",
                                where=spec.model, fix="sample a model written by a train stage")
        if spec.decoder == "sjd" and config.paradigm != "next_token":
            raise UserError(f"decoder sjd applies to next_token models; this model is {config.paradigm} "
                            "(already one forward per group)", where=f"{where}.decoder", fix="use decoder: plain")
        options = SamplingOptions(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                                  cfg_scale=spec.cfg_scale, cfg_schedule=spec.cfg_schedule, use_cache=spec.use_cache)
        if options.guided and not vocab.classes:
            raise UserError("cfg_scale needs a class-conditional model; this one has no classes",
                            where=f"{where}.cfg_scale", fix="set cfg_scale: 1")
        prefix_info = self._prefix(config, vocab, tokenizers) if spec.prefix else None
        store_vocab = max(dict(vocab.modalities)[n] for n in names)
        jobs, offset = [], 0
        for name in names:
            info = tokenizers[name]
            layout = dict(info.get("layout") or {})
            length = spec.length or (None if layout.get("scales") or layout.get("grid") else
                                     self._longest(info.get("store"), name))
            plan = plan_for_modality(config, layout, length)
            if 2 + plan.n_tokens > config.max_seq_len:
                raise UserError(f"{plan.n_tokens} tokens per {name} sample exceed the model's max_seq_len "
                                f"{config.max_seq_len}", where=f"{where}.length", fix="sample fewer tokens")
            if prefix_info is not None and prefix_info["name"] != name:
                continue
            if prefix_info is not None:
                n = spec.prefix.samples or spec.num_samples
                ids = [i % prefix_info["size"] for i in range(n)]
                labels = [prefix_info["labels"][i] if vocab.classes else None for i in ids]
                if spec.prefix.tokens not in plan.group_bounds[1:]:
                    raise UserError(f"prefix of {spec.prefix.tokens} tokens does not end a {config.paradigm} group "
                                    f"(groups end at {plan.group_bounds[1:8]}...)", where=f"{where}.prefix.tokens",
                                    fix="keep a whole number of scales/blocks")
            else:
                labels = self._labels(vocab, info.get("classes"), spec.num_samples, name)
                ids = []
            S = spec.samples_per_shard
            for k, lo in enumerate(range(0, len(labels), S)):
                shard = f"{name}-{k:04d}"
                jobs.append({
                    "name": name, "modality": info["modality"], "shard": shard, "layout": layout, "length": length,
                    "indices": list(range(offset + lo, offset + min(lo + S, len(labels)))),
                    "labels": labels[lo:lo + S], "options": options.__dict__, "decoder": spec.decoder,
                    "window": spec.sjd_window, "seed": spec.seed, "batch_size": spec.batch_size,
                    "prefix": ({"store": spec.prefix.store, "tokens": spec.prefix.tokens, "ids": ids[lo:lo + S]}
                               if prefix_info else None),
                    "formats": list(spec.media_formats(info["modality"])), "store_vocab": store_vocab,
                    "out_uri": ctx.out_uri, "store_uri": join(ctx.out_uri, "samples"),
                    "record_uri": join(ctx.out_uri, ".arpipe", "units", f"{shard}.json")})
            offset += len(labels)
        if not jobs:
            raise UserError("nothing to sample", where=where, fix="check modalities, classes and prefix")
        return jobs

    def _prefix(self, config, vocab, tokenizers) -> dict[str, Any]:
        import numpy as np

        from arpipe.stages.store import TokenStore

        store = TokenStore.open(self.spec.prefix.store)
        return {"name": vocab_name_of_store(tokenizers, store, self.spec.prefix.store), "size": len(store),
                "labels": [None if c is None else str(c) for c in store.conditions(np.arange(len(store)))]}

    def _longest(self, store_uri: str | None, name: str) -> int:
        from arpipe.stages.store import TokenStore

        if not store_uri:
            raise UserError(f"{name} tokens have variable length and the training store is unknown",
                            where=f"stages.{self.ctx.name}.length", fix="set `length`")
        return int(TokenStore.open(store_uri).lengths().max())

    def _reusable(self, job: dict[str, Any]) -> dict[str, Any] | None:
        from arpipe.stages.store import read_shard_info

        storage = storage_for(job["record_uri"])
        try:
            record = json.loads(storage.read_text(job["record_uri"]))
            read_shard_info(job["store_uri"], job["shard"])
        except (FileNotFoundError, json.JSONDecodeError, UserError):
            return None
        for rel, (size, _digest) in record["media"].items():
            if storage.size(join(self.ctx.out_uri, rel)) != size:
                return None
        return record

    def run(self) -> dict[str, Output]:
        import ray
        from ray.util import ActorPool

        from arpipe.pipeline.execute import forwarded_env
        from arpipe.stages.store import TokenizerRef, read_shard_info, write_manifest

        spec, ctx = self.spec, self.ctx
        folder = fetch_model(spec.model)
        config, vocab, tokenizers = model_info(folder)
        jobs = self._jobs(config, vocab, tokenizers)
        records = {j["shard"]: r for j in jobs if (r := self._reusable(j)) is not None}
        todo = [j for j in jobs if j["shard"] not in records]
        total = sum(len(j["indices"]) for j in jobs)
        print(f"[{ctx.name}] {total} samples in {len(jobs)} shards ({len(records)} reused) from a {config.paradigm} "
              f"model, decoder {spec.decoder}, {spec.actors} actor(s)", flush=True)
        started = time.time()
        if todo:
            device = "cuda" if spec.gpus_per_actor > 0 else "cpu"
            actor_cls = ray.remote(SampleWorker).options(num_cpus=spec.cpus_per_actor, num_gpus=spec.gpus_per_actor,
                                                         name=None, max_restarts=1, max_task_retries=1)
            env = {**forwarded_env(), "OMP_NUM_THREADS": str(max(1, int(spec.cpus_per_actor)))}
            actors = [actor_cls.remote(spec.model, env, device, spec.precision)
                      for _ in range(min(spec.actors, len(todo)))]
            pool = ActorPool(actors)
            try:
                for record in pool.map_unordered(lambda a, j: a.run_shard.remote(j), todo):
                    records[record["shard"]] = record
                    if spec.progress:
                        done = sum(r["samples"] + len(r["rejects"]) for r in records.values())
                        print(f"[{ctx.name}] shard {record['shard']}: {record['samples']} samples in "
                              f"{record['seconds']:.1f}s ({done}/{total})", flush=True)
            finally:
                for actor in actors:
                    ray.kill(actor)
        seconds = time.time() - started
        ordered = [records[j["shard"]] for j in jobs]
        store_uri = join(ctx.out_uri, "samples")
        infos = [read_shard_info(store_uri, j["shard"]) for j in jobs]
        names = list(dict.fromkeys(j["name"] for j in jobs))
        single = tokenizers[names[0]] if len(names) == 1 else None
        rejects = [dict(r, stage=ctx.name, time=time.time()) for rec in ordered for r in rec["rejects"]]
        from arpipe.stages.tokenize import write_rejects

        write_rejects(join(ctx.out_uri, "rejects.arrow"), rejects)
        if not sum(r["samples"] for r in ordered):
            raise UserError(f"all {total} samples were rejected ({rejects[0]['reason']})",
                            where=join(ctx.out_uri, "rejects.arrow"), fix="see rejects.arrow for the reasons; for octree (variable-length) models raise `length`")
        manifest = write_manifest(
            store_uri, infos, vocab=jobs[0]["store_vocab"],
            tokenizer=(TokenizerRef(id=f"sampled:{single['tokenizer_digest'][:12]}", digest=single["tokenizer_digest"])
                       if single and single.get("tokenizer_digest") else None),
            metadata={"modality": single["modality"] if single else "mixed",
                      "tokenizer_uri": single["tokenizer_uri"] if single else None,
                      "tokenizer_layout": single["layout"] if single else None,
                      "tokenizers": {n: tokenizers[n] for n in names}, "model": spec.model,
                      "sampling": {k: v for k, v in spec.model_dump(mode="json").items()
                                   if k not in SampleSpec.runtime_fields}, "rejects": len(rejects)})
        for info in infos:
            algo = info.checksum_algorithm
            ctx.known_files[f"samples/shard-{info.name}.bin"] = (info.bytes, f"{algo}:{info.checksum}")
            ctx.known_files[f"samples/shard-{info.name}.idx.arrow"] = (info.index_bytes,
                                                                       f"{algo}:{info.index_checksum}")
        for rec in ordered:
            ctx.known_files.update({rel: tuple(v) for rel, v in rec["media"].items()})
        self._contact_sheets(store_uri, names, tokenizers)
        new = [records[j["shard"]] for j in todo]
        samples = sum(r["samples"] for r in ordered)
        ctx.log_metrics({"samples": samples, "rejects": len(rejects), "shards": len(jobs),
                         "shards_reused": len(jobs) - len(todo),
                         "forward_passes": sum(r["forward_passes"] for r in ordered),
                         "samples_per_s": sum(r["samples"] for r in new) / max(seconds, 1e-9),
                         "tokens_per_s": sum(r["tokens"] for r in new) / max(seconds, 1e-9)})
        print(f"[{ctx.name}] {samples} samples in {store_uri}, {len(rejects)} rejected; media in "
              f"{join(ctx.out_uri, 'media')}", flush=True)
        for name in names:
            print(f"[{ctx.name}] contact sheet: {join(ctx.out_uri, 'media', f'contact_{name}.png')} (also in "
                  "MLflow under contact_sheets/)", flush=True)
        return {"samples": Output(path="samples", digest=manifest.digest), "media": Output(path="media")}

    def _contact_sheets(self, store_uri: str, names: list[str], tokenizers: dict[str, dict[str, Any]]) -> None:
        """``media/contact_<name>.png`` from the first samples of each modality, logged to MLflow."""
        import io

        from arpipe.stages.modalities import load_tokenizer
        from arpipe.stages.previews import contact_sheet
        from arpipe.stages.store import TokenStore

        store = TokenStore.open(store_uri)
        by_name: dict[str, list] = {n: [] for n in names}
        for i in range(len(store)):
            if all(len(t) >= CONTACT_SAMPLES for t in by_name.values()):
                break   # enough for every sheet: do not read the rest of the store
            sample = store[i]
            name = sample.key.rsplit("-", 1)[0]
            if len(by_name[name]) < CONTACT_SAMPLES:
                by_name[name].append(sample.tokens.reshape(-1))
        for name, tokens in by_name.items():
            if not tokens:
                continue
            tok = load_tokenizer(tokenizers[name]["tokenizer_uri"])
            sheet = contact_sheet(tok.decode_arrays(tokens), tokenizers[name]["modality"])
            buf = io.BytesIO()
            sheet.save(buf, format="PNG")
            rel = f"media/contact_{name}.png"
            storage_for(self.ctx.out_uri).write_bytes(join(self.ctx.out_uri, rel), buf.getvalue())
            local = self.ctx.work_dir / ".arpipe" / f"contact_{name}.png"
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(buf.getvalue())
            self.ctx.log_artifact(local, "contact_sheets")
