"""Stage kind ``sample``: draw samples from a trained model on a Ray actor pool; outputs ``samples`` and ``media``.

Each actor holds one model replica (``actors``, with ``cpus_per_actor`` /
``gpus_per_actor``) and decodes whole *sample shards*: ``samples_per_shard``
consecutive samples of one modality, sent as a :class:`ShardJob`. A shard is
the resumable unit (``stages.store.units``): the actor writes its token-store
shard, then the media files of its samples, then a record
``.arpipe/units/<shard>.json`` last; a rerun reuses every shard whose record and
files are in place, so a crash costs at most the shards in flight.

Sample ``i`` draws from a generator seeded by ``(seed, i)`` (see
``stages.models.sampling``), so its tokens do not depend on its shard, batch
or actor, and any sample can be redrawn alone. Decoding follows the model's
paradigm (one forward per token, block, scale or octree level), with a KV cache, CFG
(constant or linear ramp) and, for next-token models, optional speculative
Jacobi decoding (``decoder: sjd``), exact or with LANTERN's relaxed acceptance
(``relaxed: {k, delta}``: each actor ranks the tokenizer's codebook once into
a neighbour table, see ``stages.models.lantern``). A ``masked`` (MaskGIT) model
decodes every sample in ``masked.steps`` bidirectional forwards, keeping the
most confident draws each step (``stages.models.maskgit``). The actors load the model's EMA weights
when a train stage with ``ema:`` saved them, else its raw weights
(``weights: ema|raw`` chooses; the store's metadata says which were used).
With ``refiner`` (CoDe, next_scale models) each actor loads a second, small
model of the same tokens, which draws the scales after ``handover`` under its
own guidance; the driver checks the pair (vocabulary, tokenizers, input) before
any actor starts, and the store's metadata names the refiner and the handover.

With ``prompts`` (a model trained on captions), each prompt is tokenized by the
model's text tokenizer and fills the context's text positions; the prompt is
kept as the sample's ``caption`` in the store and as ``media/<modality>/<key>.txt``
beside the media file (the caption layout the image readers read back).

Outputs: ``samples/`` is a token store (tokenizer-local codes, one
``condition`` per sample, the sampling config in its metadata) and
``media/<modality>/<key>.<ext>`` the decoded files plus
``media/contact_<modality>.png``, which is also logged to MLflow. A sample
whose tokens do not decode (an octree that never closes) is quarantined in
``rejects.arrow`` with its reason and seed index.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arpipe.pipeline.digest import digest_bytes
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.progress import Progress
from arpipe.pipeline.stage import Output, Stage
from arpipe.pipeline.storage import CONTROL_DIR, join, normalize, storage_for
from arpipe.schemas.base import REF_PATTERN
from arpipe.schemas.sample import MaskedSpec, RelaxedSpec
from arpipe.schemas.sample import SampleStage as SampleSpec

if TYPE_CHECKING:
    from arpipe.stages.models import Relaxation, SamplingOptions
    from arpipe.stages.store import StoreUnits, UnitRecord

CONTACT_SAMPLES = 64


@dataclass(frozen=True)
class PrefixJob:
    """Samples continue the first ``tokens`` tokens of samples ``ids`` of the token store ``store``."""

    store: str
    tokens: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class InpaintJob:
    """Samples complete samples ``ids`` of the token store ``store``, keeping the tokens where ``known``."""

    store: str
    known: tuple[bool, ...]   # per target token
    ids: tuple[int, ...]


@dataclass(frozen=True)
class RefinerJob:
    """CoDe: the actor's refiner draws scales ``handover`` on, under ``options`` (its own guidance)."""

    handover: int
    options: SamplingOptions


@dataclass(frozen=True)
class ShardJob:
    """One sample shard for an actor: ``indices`` (seed indices) drawn with ``labels``, one modality."""

    units: StoreUnits             # where the shard, the media and the record go
    stage: str                    # named in the rejects
    name: str                     # the model's vocabulary name for the modality
    modality: str
    shard: str                    # the store shard's name, also the unit's
    layout: dict[str, Any]        # the tokenizer's token layout (scales, grid), as the trainer planned it
    length: int | None            # tokens per sample for variable-length layouts
    indices: tuple[int, ...]
    labels: tuple[Any, ...]
    options: SamplingOptions
    decoder: str
    window: int                   # speculative Jacobi window (decoder: sjd)
    seed: int
    batch_size: int
    prefix: PrefixJob | None
    formats: tuple[str, ...]      # media formats to write per sample
    store_vocab: int
    prompts: tuple[str, ...] = ()                  # each sample's prompt text (empty: no prompts)
    prompt_tokens: tuple[tuple[int, ...], ...] = ()   # and its text tokens
    controls: tuple[tuple[int, ...], ...] = ()        # each sample's control-map tokens (empty: none)
    inpaint: InpaintJob | None = None
    relaxed: RelaxedSpec | None = None                # LANTERN's acceptance (decoder: sjd)
    refiner: RefinerJob | None = None                 # CoDe: the actor's refiner draws the last scales
    masked: MaskedSpec | None = None                  # MaskGIT's decoding of a masked model (None: its defaults)


def read_prompts(prompts: list[str] | str, base_dir: Path) -> list[tuple[str, str]]:
    """``(where, text)`` of each prompt: a YAML list, or a ``.txt`` (a prompt a line) or ``.jsonl`` file
    (``{"prompt": ...}`` a line); ``where`` names the file and line (or list index) for errors."""
    if isinstance(prompts, list):
        found = [(f"prompts[{i}]", str(p)) for i, p in enumerate(prompts)]
    else:
        uri = normalize(prompts, base_dir)
        try:
            text = storage_for(uri).read_bytes(uri).decode("utf-8")
        except FileNotFoundError:
            raise UserError("prompts file not found", where=prompts,
                            fix="point prompts at a .txt or .jsonl file, or give a list") from None
        except UnicodeDecodeError as err:
            raise UserError(f"the prompts file is not UTF-8 ({err.reason} at byte {err.start})", where=prompts,
                            fix="save it as UTF-8") from None
        if not prompts.endswith((".txt", ".jsonl")):
            raise UserError("a prompts file is a .txt (one prompt a line) or a .jsonl file", where=prompts,
                            fix="rename it or convert it")
        found = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{prompts}:{n}"
            if prompts.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise UserError(f"not a JSON object ({err})", where=where,
                                    fix='write one {"prompt": "..."} object a line') from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise UserError("the line has no \"prompt\" text", where=where,
                                    fix='write one {"prompt": "..."} object a line')
                line = row["prompt"]
            found.append((where, line))
    for where, text in found:
        if not text.strip():
            raise UserError("the prompt is empty", where=where, fix="write a prompt, or remove it")
    if not found:
        raise UserError("the prompts file holds no prompt", where=str(prompts), fix="write one prompt a line")
    return found


def _vocab_differences(ours, theirs) -> list[str]:
    """What differs between two models' vocabularies (VocabLayout), in a few words each."""
    differ = []
    if ours.modalities != theirs.modalities:
        differ.append("modalities " + " vs ".join(", ".join(f"{n} ({s} codes)" for n, s in v.modalities) or "none"
                                                  for v in (ours, theirs)))
    if ours.classes != theirs.classes:
        differ.append("classes " + " vs ".join(f"{len(v.classes)} ({', '.join(v.classes[:4])}"
                                               f"{', ...' if len(v.classes) > 4 else ''})" for v in (ours, theirs)))
    if ours.prompts != theirs.prompts:
        differ.append("prompt streams " + " vs ".join(", ".join(f"{n} ({s} tokens, {k} positions)"
                                                                for n, s, k in v.prompts) or "none"
                                                      for v in (ours, theirs)))
    return differ


def _control_metadata(info: dict[str, Any], vocab) -> dict[str, Any]:
    """The samples store's ``control`` metadata, as a tokenize stage's store has it, from the model's control
    tokenizer: what made and what decodes the samples' ``control_tokens`` (evaluate's control agreement)."""
    return {"transform": info["transform"], "sigma": info.get("sigma", 1.0), "uri": info["tokenizer_uri"],
            "digest": info["tokenizer_digest"], "vocab_size": {n: s for n, s, _k in vocab.prompts}["control"]}


class SampleWorker:
    """One model replica in a Ray actor; decodes shards into the stage folder."""

    def __init__(self, model_uri: str, env: dict[str, str], device: str, precision: str, weights: str = "raw",
                 refiner_uri: str | None = None, refiner_weights: str = "raw", compile: bool = False):
        import torch

        from arpipe.stages.models.folder import open_model

        os.environ.update(env)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device != "cpu" else None
        opened = open_model(model_uri, device=device, dtype=dtype, check_weights=False,   # the driver checked
                            weights=weights)
        self.config, self.vocab, self.tokenizers = opened.config, opened.vocab, opened.tokenizers
        self.model, self.scale_inputs = opened.model, opened.scale_inputs
        self.refiner = None   # CoDe's small model; the driver checked that it reads the model's tokens
        if refiner_uri is not None:
            self.refiner = open_model(refiner_uri, device=device, dtype=dtype, check_weights=False,
                                      weights=refiner_weights).model
        if compile:   # the driver checked that torch.compile runs here; chunks of any length share one graph
            from arpipe.stages.models import compile_blocks

            for model in (self.model, self.refiner):
                if model is not None:
                    compile_blocks(model, dynamic=True, device=device)
        self.device = device   # the tokenizers decode here too (a CPU actor's vqvae must not take a GPU)
        self._loaded: dict[str, Any] = {}
        self._relaxations: dict[tuple[str, int, float], Relaxation] = {}

    def tokenizer(self, name: str):
        if name not in self._loaded:
            from arpipe.stages.modalities import load_tokenizer

            self._loaded[name] = load_tokenizer(self.tokenizers[name]["tokenizer_uri"], device=self.device)
        return self._loaded[name]

    def relaxation(self, name: str, relaxed: RelaxedSpec) -> Relaxation:
        """LANTERN's neighbourhoods of ``name``'s codes, ranked once per actor (on the CPU in float64, so
        every actor, whatever its device, ranks them alike and a sample's tokens do not depend on its actor)."""
        key = (name, relaxed.k, relaxed.delta)
        if key not in self._relaxations:
            from arpipe.stages.models import Relaxation

            self._relaxations[key] = Relaxation.from_codebook(
                self.tokenizer(name).code_embeddings(), k=relaxed.k, delta=relaxed.delta,
                start=self.vocab.code_range(name)[0], vocab_size=self.config.vocab_size)
        return self._relaxations[key]

    def run_shard(self, job: ShardJob) -> UnitRecord:
        import numpy as np

        from arpipe.stages.modalities import TokenizerError, media
        from arpipe.stages.models import MaskedDecoding, Prompt, generate, generate_masked, generate_sjd
        from arpipe.stages.models.folder import plan_for_modality
        from arpipe.stages.store import Reject, ShardWriter, TokenStore, UnitRecord

        started = time.time()
        name, out_uri = job.name, job.units.out_uri
        tok = self.tokenizer(name)
        plan = plan_for_modality(self.config, job.layout, job.length, self.scale_inputs.get(name))
        grid = tuple(job.layout["grid"]) if "grid" in job.layout and "scales" not in job.layout else None
        prefix_store = TokenStore.open(job.prefix.store) if job.prefix else None
        inpaint_store = TokenStore.open(job.inpaint.store) if job.inpaint else None
        out_storage = storage_for(out_uri)
        media_files: dict[str, tuple[int, str]] = {}
        rejects: list[Reject] = []
        passes = refiner_passes = tokens = 0
        writer = ShardWriter(job.units.store_uri, job.shard, vocab_size=job.store_vocab)
        n, B = len(job.indices), job.batch_size
        for a in range(0, n, B):
            indices, labels = job.indices[a:a + B], list(job.labels[a:a + B])
            prefix = None
            if prefix_store is not None:
                import torch

                M = job.prefix.tokens
                prefix = torch.stack([torch.from_numpy(prefix_store.tokens(int(s)).reshape(-1)[:M].astype(np.int64))
                                      for s in job.prefix.ids[a:a + B]])
            texts = job.prompts[a:a + B] if job.prompts else None
            streams = [{**({"text": job.prompt_tokens[a + k]} if texts else {}),
                        **({"control": job.controls[a + k]} if job.controls else {})} for k in range(len(labels))]
            prompt = Prompt.from_vocab(self.vocab, name, labels, prefix, streams)
            if inpaint_store is not None:
                import torch

                known_N = torch.tensor(job.inpaint.known)
                originals = torch.stack([self.vocab.to_global(name, torch.from_numpy(
                    inpaint_store.tokens(int(s)).reshape(-1).astype(np.int64))) for s in job.inpaint.ids[a:a + B]])
                prompt.known_BN = torch.where(known_N, originals, torch.full_like(originals, -1))
            if self.config.paradigm == "masked":
                decoding = MaskedDecoding(**job.masked.model_dump()) if job.masked else MaskedDecoding()
                gen = generate_masked(self.model, plan, prompt, job.options, decoding, seed=job.seed,
                                      sample_indices=indices)
            elif job.decoder == "sjd":
                gen = generate_sjd(self.model, plan, prompt, job.options, seed=job.seed, sample_indices=indices,
                                   window=job.window,
                                   relaxation=self.relaxation(name, job.relaxed) if job.relaxed else None)
            else:
                code = job.refiner
                gen = generate(self.model, plan, prompt, job.options, seed=job.seed, sample_indices=indices,
                               refiner=self.refiner if code else None, handover=code.handover if code else None,
                               refiner_options=code.options if code else None)
            passes += gen.forward_passes
            refiner_passes += gen.refiner_passes
            local = self.vocab.to_local(name, gen.tokens.cpu()).numpy()
            for k, i in enumerate(indices):
                key = f"{name}-{i:06d}"
                idx = local[k] if gen.lengths is None else local[k][:int(gen.lengths[k])]   # next_level: its tree
                try:
                    if hasattr(tok, "trim"):
                        idx = tok.trim(idx)
                    decoded = tok.decode_arrays([idx])[0]
                except (TokenizerError, ValueError) as err:
                    rejects.append(Reject(source=f"{key} (seed {job.seed}, index {i})",
                                          reason=f"tokens do not decode: {err}", stage=job.stage, time=time.time()))
                    continue
                if grid is not None and int(np.prod(grid)) == idx.size:
                    idx = idx.reshape(grid)
                writer.append(idx, key=key, modality=job.modality, condition=labels[k],
                              source_uri=(job.prefix.store if job.prefix else
                                          f"{job.inpaint.store}#{job.inpaint.ids[a + k]}" if job.inpaint else None),
                              caption=texts[k] or None if texts else None,
                              caption_tokens=job.prompt_tokens[a + k] or None if texts else None,
                              control_tokens=job.controls[a + k] if job.controls else None)
                tokens += int(idx.size)
                files = [(f"media/{name}/{key}{media.EXTENSIONS[fmt]}", media.encode(decoded, fmt))
                         for fmt in job.formats]
                if texts and texts[k] and job.formats:   # the prompt beside its picture, as captions sit beside images
                    files.append((f"media/{name}/{key}.txt", texts[k].encode("utf-8")))
                if job.controls and job.formats:   # and the control map it was drawn under
                    control = self.tokenizer("control").decode_arrays([np.asarray(job.controls[a + k])])[0]
                    files.append((f"media/{name}/{key}.control.png", media.encode(np.clip(control, 0, 1), "png")))
                for rel, data in files:
                    out_storage.write_bytes(join(out_uri, rel), data, durable=False)
                    media_files[rel] = (len(data), digest_bytes(data))
        writer.commit()
        record = UnitRecord(name=job.shard, fingerprint=job.units.fingerprint, shards=(job.shard,),
                            samples=writer.samples, tokens=tokens, rejects=tuple(rejects), files=media_files,
                            seconds=time.time() - started,
                            detail={"forward_passes": passes, **({"refiner_passes": refiner_passes}
                                                                 if job.refiner else {})})
        job.units.write(record)
        return record


class SampleStage(Stage):
    kind = "sample"
    version = "1"
    placement = "driver"   # it runs its own actor pool
    spec: SampleSpec

    def _labels(self, vocab, trained: list[str] | None, n: int, name: str, *, prompted: bool = False) -> list[Any]:
        """One label per sample; ``trained`` are the classes this modality's data had (None: unknown).
        With prompts the default is no class (the prompts condition the samples)."""
        spec, where = self.spec, f"stages.{self.ctx.name}.classes"
        if prompted and spec.classes is None:
            return [None] * n
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

    @classmethod
    def check_across(cls, spec: SampleSpec, stages) -> str | None:
        """A refiner trained in this pipeline on other token stores than the model cannot read its tokens as the
        model does (another vocabulary, or another tokenizer's codes): refused before anything runs."""
        if spec.refiner is None:
            return None
        trains = []
        for uri in (spec.model, spec.refiner.model):
            ref = REF_PATTERN.fullmatch(uri.strip())
            if ref is None or ref.group(1) not in stages or stages[ref.group(1)].kind != "train":
                return None   # a model from elsewhere: checked when the stage runs
            trains.append(ref.group(1))
        stores = [sorted({d.store for d in stages[t].data}) for t in trains]
        if stores[0] != stores[1]:
            return (f"refiner.model: the refiner's train stage {trains[1]!r} trains on {', '.join(stores[1])} but "
                    f"the model's {trains[0]!r} on {', '.join(stores[0])}; CoDe's two models read the same tokens: "
                    f"train {trains[1]!r} on the data of {trains[0]!r}")
        return None

    @classmethod
    def source_digest(cls, spec: SampleSpec, pipeline_dir: Path) -> str | None:
        """A prompts file and a mask image are read from outside the pipeline: their listings key the cache."""
        from arpipe.pipeline.digest import listing_digest
        from arpipe.pipeline.models import is_model_uri, resolve_model

        files = [f for f in (spec.prompts if isinstance(spec.prompts, str) else None,
                             spec.inpaint.mask if spec.inpaint else None) if f and not REF_PATTERN.search(f)]
        parts = [listing_digest(f, pipeline_dir) for f in files]
        for uri, where in ((spec.model, "model"), (spec.refiner.model if spec.refiner else "", "refiner.model")):
            if is_model_uri(uri):   # the version an alias names now: moving the alias reruns the stage
                parts.append(resolve_model(uri, where=where).key)
        return digest_bytes("\n".join(parts).encode()) if parts else None

    def _jobs(self, config, vocab, tokenizers: dict[str, dict[str, Any]], units: StoreUnits,
              refiner_config=None) -> list[ShardJob]:
        from arpipe.stages.models import SamplingOptions
        from arpipe.stages.models.folder import plan_for_modality

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
        if spec.relaxed is not None:
            self._check_relaxed(config, vocab, tokenizers, names)
        if spec.masked is not None and config.paradigm != "masked":
            raise UserError(f"masked sets how a masked (MaskGIT) model decodes; this model is {config.paradigm}",
                            where=f"{where}.masked", fix="remove masked, or sample a model trained with paradigm: "
                                                         "masked")
        if config.paradigm == "masked" and spec.inpaint is not None and spec.inpaint.lookahead > 1:
            raise UserError("lookahead chooses among draws of a group before known tokens; a masked model draws "
                            "every token at once, seeing the known ones", where=f"{where}.inpaint.lookahead",
                            fix="remove lookahead (a masked model in-paints without it)")
        if spec.prefix is not None and config.paradigm == "next_level":
            raise UserError("prefix continues a fixed number of tokens; a next_level model draws whole octree "
                            "levels, as many tokens as the level above marks", where=f"{where}.prefix",
                            fix="remove prefix (next_level samples whole trees)")
        if spec.decoder == "sjd" and config.paradigm != "next_token":
            raise UserError(f"decoder sjd applies to next_token models; this model is {config.paradigm} "
                            "(already one forward per group)", where=f"{where}.decoder", fix="use decoder: plain")
        options = SamplingOptions(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                                  cfg_scale=spec.cfg_scale, cfg_schedule=spec.cfg_schedule, use_cache=spec.use_cache,
                                  lookahead=spec.inpaint.lookahead if spec.inpaint else 1)
        if options.guided and not vocab.classes and not vocab.prompts:
            raise UserError("cfg_scale needs a conditional model; this one has no classes and no prompts",
                            where=f"{where}.cfg_scale", fix="set cfg_scale: 1")
        refiner = None
        if spec.refiner is not None:
            refiner = RefinerJob(handover=spec.refiner.handover, options=replace(
                options, cfg_scale=spec.cfg_scale if spec.refiner.cfg_scale is None else spec.refiner.cfg_scale,
                cfg_schedule=spec.refiner.cfg_schedule or spec.cfg_schedule))
            if refiner.options.guided and not vocab.classes and not vocab.prompts:
                raise UserError("cfg_scale needs a conditional model; this one has no classes and no prompts",
                                where=f"{where}.refiner.cfg_scale", fix="set cfg_scale: 1")
        if spec.inpaint and spec.decoder == "sjd":
            raise UserError("in-painting keeps known tokens group by group; speculative Jacobi decoding drafts "
                            "past them", where=f"{where}.decoder", fix="use decoder: plain with inpaint")
        prefix_info = self._prefix(config, vocab, tokenizers) if spec.prefix else None
        texts, prompt_tokens = self._prompts(vocab, tokenizers) if spec.prompts is not None else ([], [])
        controls = self._controls(vocab, tokenizers) if spec.controls else []
        if controls:   # control k with prompt k (cycling), each pair samples_per_control times
            n = spec.controls.samples_per_control
            if texts:
                texts, prompt_tokens = ([texts[k % len(texts)] for k in range(len(controls)) for _ in range(n)],
                                        [prompt_tokens[k % len(texts)] for k in range(len(controls)) for _ in range(n)])
            controls = [c for c in controls for _ in range(n)]
        elif texts:   # each prompt samples_per_prompt times in a row
            n = spec.samples_per_prompt
            texts, prompt_tokens = [t for t in texts for _ in range(n)], [t for t in prompt_tokens for _ in range(n)]
        inpaint = self._inpaint(config, vocab, tokenizers) if spec.inpaint else None
        store_vocab = max(dict(vocab.modalities)[n] for n in names)
        jobs, offset = [], 0
        for name in names:
            info = tokenizers[name]
            layout = dict(info.get("layout") or {})
            length = spec.length or (None if layout.get("scales") or layout.get("grid") else
                                     self._longest(info.get("store"), name))
            if spec.size is not None or layout.get("sizes"):
                if spec.length is not None and layout.get("sizes"):
                    raise UserError("length is a size's token count for this model (its tokenizer takes several "
                                    "image sizes)", where=f"{where}.length", fix="set size instead of length")
                length = self._length_of_size(layout, name)
            plan = plan_for_modality(config, layout, length)
            if vocab.context_len + plan.n_tokens > config.max_seq_len:
                raise UserError(f"{plan.n_tokens} tokens per {name} sample exceed the model's max_seq_len "
                                f"{config.max_seq_len}", where=f"{where}.length", fix="sample fewer tokens")
            if refiner is not None:
                self._check_handover(plan, name, vocab.context_len, refiner_config)
            if prefix_info is not None and prefix_info["name"] != name:
                continue
            if inpaint is not None and inpaint["name"] != name:
                continue
            inpaint_ids: list[int] = []
            if prefix_info is not None:
                n = spec.prefix.samples or spec.num_samples
                ids = [i % prefix_info["size"] for i in range(n)]
                labels = [prefix_info["labels"][i] if vocab.classes else None for i in ids]
                if config.paradigm != "masked" and spec.prefix.tokens not in plan.group_bounds[1:]:
                    raise UserError(f"prefix of {spec.prefix.tokens} tokens does not end a {config.paradigm} group "
                                    f"(groups end at {plan.group_bounds[1:8]}...)", where=f"{where}.prefix.tokens",
                                    fix="keep a whole number of scales/blocks")
            elif inpaint is not None:
                n = spec.inpaint.samples or spec.num_samples
                inpaint_ids = [i % inpaint["size"] for i in range(n)]
                labels = [inpaint["labels"][i] if vocab.classes else None for i in inpaint_ids]
                stored = [inpaint["store"][i] for i in inpaint_ids] if inpaint["store"] is not None else []
                texts = [s.caption or "" for s in stored]
                prompt_tokens = [tuple(s.caption_tokens or ()) for s in stored]
                ids = []
            elif texts or controls:
                labels = self._labels(vocab, info.get("classes"), len(texts or controls), name, prompted=True)
                ids = []
            else:
                labels = self._labels(vocab, info.get("classes"), spec.num_samples, name)
                ids = []
            S = spec.samples_per_shard
            for k, lo in enumerate(range(0, len(labels), S)):
                shard = f"{name}-{k:04d}"
                jobs.append(ShardJob(
                    units=units, stage=ctx.name, name=name, modality=info["modality"], shard=shard, layout=layout,
                    length=length, indices=tuple(range(offset + lo, offset + min(lo + S, len(labels)))),
                    labels=tuple(labels[lo:lo + S]), options=options, decoder=spec.decoder, window=spec.sjd_window,
                    seed=spec.seed, batch_size=spec.batch_size,
                    prefix=(PrefixJob(store=spec.prefix.store, tokens=spec.prefix.tokens, ids=tuple(ids[lo:lo + S]))
                            if prefix_info else None),
                    formats=tuple(spec.media_formats(info["modality"])), store_vocab=store_vocab,
                    prompts=tuple(texts[lo:lo + S]), prompt_tokens=tuple(prompt_tokens[lo:lo + S]),
                    controls=tuple(controls[lo:lo + S]), relaxed=spec.relaxed, masked=spec.masked,
                    inpaint=(InpaintJob(store=spec.inpaint.store, known=inpaint["known"],
                                        ids=tuple(inpaint_ids[lo:lo + S])) if inpaint else None),
                    refiner=refiner))
            offset += len(labels)
        if not jobs:
            raise UserError("nothing to sample", where=where, fix="check modalities, classes and prefix")
        return jobs

    def _length_of_size(self, layout: dict[str, Any], name: str) -> int:
        """Tokens of a sample at ``size`` (flexvq: the scales up to its grid); the largest size by default."""
        from arpipe.stages.modalities.flexvq import length_of_size

        size, where = self.spec.size, f"stages.{self.ctx.name}.size"
        sizes = [tuple(s) for s in layout.get("sizes") or []]
        if not sizes:
            raise UserError(f"size applies to a model whose tokenizer takes several image sizes (flexvq); this "
                            f"model's {name!r} tokens have one layout", where=where,
                            fix="remove size, or sample a model trained on flexvq tokens")
        if size is None:
            return int(layout["lengths"][-1])
        if isinstance(size, list) and len(size) != 2:
            raise UserError(f"size {size} is not an image size", where=where, fix="give a side, or [h, w]")
        length = length_of_size(layout, size)
        if length is None:
            shown = "x".join(str(n) for n in ([size, size] if isinstance(size, int) else size))
            raise UserError(f"size {shown} is not one the model's {name!r} tokenizer takes "
                            f"({', '.join(f'{h}x{w}' for h, w in sizes)})", where=where,
                            fix="pick one of them, or fit a flexvq tokenizer with that size in its sizes "
                                "(its grid among the scales) and train on its tokens")
        return length

    def _check_handover(self, plan, name: str, context_len: int, refiner_config) -> None:
        """The refiner takes over after ``handover`` of the plan's scales, and its sequences fit it."""
        handover, where = self.spec.refiner.handover, f"stages.{self.ctx.name}.refiner"
        if handover >= plan.n_groups:
            raise UserError(f"handover {handover} leaves the refiner nothing to draw: the {name} samples have "
                            f"{plan.n_groups} scales", where=f"{where}.handover",
                            fix=f"use handover 1..{plan.n_groups - 1} (the scales the model draws)")
        if context_len + plan.n_tokens > refiner_config.max_seq_len:
            raise UserError(f"{plan.n_tokens} tokens per {name} sample exceed the refiner's max_seq_len "
                            f"{refiner_config.max_seq_len}", where=f"{where}.model",
                            fix="train the refiner on the model's token stores")

    def _load_refiner(self, config, vocab, tokenizers: dict[str, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        """The refiner's config and what the store's metadata says of it (where, which weights, the handover),
        checked against the model: a next_scale model that reads the same tokens (vocabulary, tokenizers,
        input) as the model does."""
        from arpipe.pipeline.models import resolve_model, weights_digest
        from arpipe.stages.models.folder import choose_weights, fetch_model, model_info

        spec, ctx, where = self.spec.refiner, self.ctx, f"stages.{self.ctx.name}.refiner"
        if config.paradigm != "next_scale":
            raise UserError(f"a refiner (CoDe) draws the last scales of a next_scale model; this model is "
                            f"{config.paradigm}", where=where, fix="remove refiner, or sample a next_scale model")
        ref = resolve_model(spec.model, ctx.tracking_uri, where=f"{where}.model")
        folder = fetch_model(ref.location)
        theirs, their_vocab, their_tokenizers = model_info(folder, location=ref.location)
        differ = [f"{k} {getattr(config, k)} vs {getattr(theirs, k)}" for k in ("paradigm", "feature_dim")
                  if getattr(config, k) != getattr(theirs, k)]
        differ += _vocab_differences(vocab, their_vocab)
        for name, info in tokenizers.items():
            digest = (their_tokenizers.get(name) or {}).get("tokenizer_digest")
            if digest != info.get("tokenizer_digest"):
                differ.append(f"{name} tokenizer {str(info.get('tokenizer_digest'))[:19]} vs {str(digest)[:19]}")
        if differ:
            drafter, refiner = self._shown(self.spec.model), self._shown(spec.model)
            raise UserError(f"the model {drafter} and the refiner {refiner} do not read the same tokens "
                            f"({'; '.join(differ)})", where=f"{where}.model",
                            fix="train the refiner on the model's token stores")
        weights = choose_weights(folder, spec.weights, where=f"{where}.weights")
        model_id = ref.model_id or ctx.run_log.find_model(weights_digest(ref.location))
        ctx.run_log.use_model(model_id, ref.registered, role="refiner")
        return theirs, {"model": spec.model, "model_location": ref.location, "model_id": model_id,
                        "registered_model": ref.registered, "weights": weights, "handover": spec.handover}

    def _shown(self, uri: str) -> str:
        """A model as the user named it: ``${stage.model}`` for an upstream stage's output, else its URI."""
        return next((f"${{{key}}}" for key, value in self.ctx.inputs.items() if value == uri), uri)

    def _check_relaxed(self, config, vocab, tokenizers: dict[str, dict[str, Any]], names: list[str]) -> None:
        """``relaxed`` needs next-token decoding and, for each sampled modality, a codebook of at least k codes."""
        from arpipe.stages.modalities import load_tokenizer

        k, where = self.spec.relaxed.k, f"stages.{self.ctx.name}.relaxed"
        if config.paradigm != "next_token":
            raise UserError(f"relaxed (LANTERN) relaxes speculative Jacobi decoding of next_token models; this model "
                            f"is {config.paradigm}", where=where, fix="remove relaxed (and decoder: sjd)")
        for name in names:
            tok = load_tokenizer(tokenizers[name]["tokenizer_uri"])
            codebook_KD = tok.code_embeddings()
            if codebook_KD is None:
                raise UserError(f"relaxed ranks a code's neighbours in its tokenizer's codebook; the {name} tokenizer "
                                f"({tok.type}) has none", where=where,
                                fix="remove relaxed, or sample a model whose tokens come from patch_vq, msvq or vqvae")
            size = dict(vocab.modalities)[name]
            if codebook_KD.shape[0] != size:
                raise UserError(f"the {name} tokenizer's codebook has {codebook_KD.shape[0]} codes but the model's "
                                f"vocabulary {size}", where=self.spec.model, fix="sample a model written by a train stage")
            if k > size:
                raise UserError(f"relaxed.k {k} exceeds the {size} codes of the {name} codebook", where=where,
                                fix=f"use k <= {size}")

    def _prompts(self, vocab, tokenizers) -> tuple[list[str], list[tuple[int, ...]]]:
        """Each prompt's text and text tokens, in the order given."""
        from arpipe.stages.modalities import load_tokenizer

        spec, where = self.spec, f"stages.{self.ctx.name}.prompts"
        if not vocab.prompts or "text" not in tokenizers:
            raise UserError("prompts need a model trained on captions; this one was not", where=where,
                            fix="train on a store tokenized with a text_tokenizer, or remove prompts")
        found = read_prompts(spec.prompts, self.ctx.pipeline_dir)
        tok = load_tokenizer(tokenizers["text"]["tokenizer_uri"])
        encoded = tok.encode_texts([text for _where, text in found])
        length = dict((n, k) for n, _s, k in vocab.prompts)["text"]
        for (at, text), ids in zip(found, encoded, strict=True):
            if len(ids) > length:
                raise UserError(f"the prompt {text[:40]!r} is {len(ids)} text tokens; the model was trained on "
                                f"captions of at most {length}", where=at, fix="shorten the prompt")
        return [text for _at, text in found], [tuple(int(t) for t in ids) for ids in encoded]

    def _controls(self, vocab, tokenizers) -> list[tuple[int, ...]]:
        """The control maps' tokens, from a store tokenized with the model's ``control:`` or from images."""
        import numpy as np

        from arpipe.stages.modalities import SampleError, load_tokenizer, open_reader
        from arpipe.stages.store import TokenStore

        spec, where = self.spec.controls, f"stages.{self.ctx.name}.controls"
        info = tokenizers.get("control")
        if "control" not in {n for n, _s, _k in vocab.prompts} or info is None:
            raise UserError("controls need a model trained on a store with control maps; this one was not",
                            where=where, fix="train on a store tokenized with control:, or remove controls")
        if spec.store is not None:
            store = TokenStore.open(spec.store)
            meta = (store.manifest.metadata or {}).get("control") or {}
            if meta.get("digest") != info["tokenizer_digest"] or meta.get("transform") != info["transform"]:
                raise UserError("the store holds no control maps made as the model's were (its tokenize stage "
                                f"needs control: {{transform: {info['transform']}, tokenizer: <the model's>}})",
                                where=spec.store, fix="tokenize the store with the model's control setting")
            n = min(spec.samples or len(store), len(store))
            return [tuple(int(t) for t in store[i].control_tokens) for i in range(n)]
        tok = load_tokenizer(info["tokenizer_uri"])
        channels, height, width = (int(n) for n in tok.input_shape[-3:])
        uri = normalize(spec.images, self.ctx.pipeline_dir)
        try:
            reader = open_reader("image", uri, channels=channels, size=[height, width], labels=None,
                                 transform=spec.transform)
            samples = [s.data for s in reader]
        except SampleError as err:
            raise UserError(f"a control image does not read: {err}", where=spec.images,
                            fix="give a folder of images (PNG, JPEG, ...)") from None
        if not samples:
            raise UserError("the folder holds no control image", where=spec.images, fix="add control images")
        samples = samples[:spec.samples or len(samples)]
        return [tuple(int(t) for t in np.asarray(ids).reshape(-1)) for ids in tok.encode_arrays(samples)]

    def _inpaint(self, config, vocab, tokenizers) -> dict[str, Any]:
        """The store to complete and, from ``box`` or ``mask``, which of its tokens are kept."""
        import numpy as np

        from arpipe.stages.modalities import load_tokenizer
        from arpipe.stages.models import known_cells
        from arpipe.stages.models.folder import vocab_name_of_store
        from arpipe.stages.store import TokenStore

        spec, where = self.spec.inpaint, f"stages.{self.ctx.name}.inpaint"
        store = TokenStore.open(spec.store)
        name = vocab_name_of_store(tokenizers, store, spec.store)
        info = tokenizers[name]
        layout = dict(info.get("layout") or {})
        shapes = layout.get("scales") or ([layout["grid"]] if layout.get("grid") else None)
        tok = load_tokenizer(info["tokenizer_uri"])
        if info["modality"] != "image" or not shapes:
            raise UserError(f"in-painting takes images on a token grid; this model's {name!r} is "
                            f"{info['modality']} with {'no fixed grid' if not shapes else 'a grid'}", where=where,
                            fix="in-paint an image model (msvq, patch_vq or vqvae tokens)")
        shapes = [[s, s] if isinstance(s, int) else s for s in shapes]
        height, width = (int(n) for n in tok.input_shape[-2:])
        if layout.get("sizes"):   # flexvq: the samples are drawn at one size, the scales up to its grid
            length = self._length_of_size(layout, name)
            height, width = tok.size_of(length)
            shapes = shapes[:layout["boundaries"].index(length)]
            other = np.flatnonzero(store.lengths() != length)
            if len(other):
                raise UserError(f"sample {int(other[0])} of the store is not {height}x{width}, the size drawn "
                                "(in-painting completes samples of that size)", where=spec.store,
                                fix=f"in-paint a store of {height}x{width} images, or set size to theirs")
        if spec.box is not None:
            top, left, bottom, right = spec.box
            if not (0 <= top < bottom <= height and 0 <= left < right <= width):
                raise UserError(f"box {spec.box} is not a rectangle inside the {height}x{width} samples",
                                where=f"{where}.box", fix=f"give [top, left, bottom, right] within {height}x{width}")
            keep = np.ones((height, width), dtype=bool)
            keep[top:bottom, left:right] = False
        else:
            keep = self._mask(spec.mask, height, width)
        known = tuple(bool(k) for k in known_cells(shapes, keep).tolist())
        if all(known):
            raise UserError("the region to draw covers no whole token: every token is kept", where=where,
                            fix="draw a larger region")
        indices = np.arange(len(store))
        return {"name": name, "size": len(store), "known": known,
                "labels": [None if c is None else str(c) for c in store.conditions(indices)],
                "store": store if vocab.prompts else None}   # a captioned model completes with the stored captions

    def _mask(self, mask: str, height: int, width: int):
        """A mask image as a boolean ``keep`` array (black = kept), checked against the samples' size."""
        import io

        import numpy as np
        from PIL import Image, UnidentifiedImageError

        uri = normalize(mask, self.ctx.pipeline_dir)
        try:
            image = Image.open(io.BytesIO(storage_for(uri).read_bytes(uri))).convert("L")
        except FileNotFoundError:
            raise UserError("mask image not found", where=mask, fix="point mask at an image file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"the mask is not an image ({err})", where=mask,
                            fix="give a PNG: white pixels are drawn, black ones kept") from None
        if image.size != (width, height):
            raise UserError(f"the mask is {image.size[0]}x{image.size[1]} pixels but the samples are "
                            f"{width}x{height}", where=mask, fix=f"resize the mask to {width}x{height}")
        return np.asarray(image) < 128

    def _prefix(self, config, vocab, tokenizers) -> dict[str, Any]:
        import numpy as np

        from arpipe.stages.models.folder import vocab_name_of_store
        from arpipe.stages.store import TokenStore

        store = TokenStore.open(self.spec.prefix.store)
        n = min(self.spec.prefix.samples or self.spec.num_samples, len(store))
        short = np.flatnonzero(store.lengths()[:n] < self.spec.prefix.tokens)
        if len(short):   # a store of several sizes (flexvq): a smaller image has fewer tokens than the prefix
            raise UserError(f"sample {int(short[0])} of the prefix store holds {int(store.lengths()[short[0]])} "
                            f"tokens, fewer than prefix.tokens {self.spec.prefix.tokens}",
                            where=self.spec.prefix.store,
                            fix="continue a store whose samples all hold the prefix (one image size), or a "
                                "shorter prefix")
        return {"name": vocab_name_of_store(tokenizers, store, self.spec.prefix.store), "size": len(store),
                "labels": [None if c is None else str(c) for c in store.conditions(np.arange(len(store)))]}

    def _longest(self, store_uri: str | None, name: str) -> int:
        from arpipe.stages.store import TokenStore

        if not store_uri:
            raise UserError(f"{name} tokens have variable length and the training store is unknown",
                            where=f"stages.{self.ctx.name}.length", fix="set `length`")
        return int(TokenStore.open(store_uri).lengths().max())

    def run(self) -> dict[str, Output]:
        import ray

        from arpipe.pipeline.models import resolve_model, weights_digest
        from arpipe.stages.models.folder import choose_weights, fetch_model, model_info
        from arpipe.stages.store import StoreUnits, TokenizerRef, fan_out

        spec, ctx = self.spec, self.ctx
        ref = resolve_model(spec.model, ctx.tracking_uri, where=f"stages.{ctx.name}.model")
        folder = fetch_model(ref.location)
        config, vocab, tokenizers = model_info(folder, location=ref.location)
        weights = choose_weights(folder, spec.weights, where=f"stages.{ctx.name}.weights")
        model_id = ref.model_id or ctx.run_log.find_model(weights_digest(ref.location))
        ctx.run_log.use_model(model_id, ref.registered)
        refiner_config, refiner = self._load_refiner(config, vocab, tokenizers) if spec.refiner else (None, None)
        units = StoreUnits(out_uri=ctx.out_uri, store="samples", fingerprint=ctx.fingerprint)
        jobs = self._jobs(config, vocab, tokenizers, units, refiner_config)
        records = {j.shard: r for j in jobs if (r := units.reusable(j.shard)) is not None}
        todo = [j for j in jobs if j.shard not in records]
        total = sum(len(j.indices) for j in jobs)
        print(f"[{ctx.name}] {total} samples in {len(jobs)} shards ({len(records)} reused) from a {config.paradigm} "
              f"model, decoder {spec.decoder}, {spec.actors} actor(s)"
              + (f"; the refiner {self._shown(spec.refiner.model)} draws from scale {spec.refiner.handover + 1} on"
                 if refiner else ""), flush=True)
        started = time.time()
        if todo:
            device = "cuda" if spec.gpus_per_actor > 0 else "cpu"
            actor_cls = ray.remote(SampleWorker).options(num_cpus=spec.cpus_per_actor, num_gpus=spec.gpus_per_actor,
                                                         name=None, max_restarts=1, max_task_retries=1)
            env = {**ctx.forwarded_env(), "OMP_NUM_THREADS": str(max(1, int(spec.cpus_per_actor)))}
            compiled = spec.compile
            if compiled:
                from arpipe.stages.models import compile_unavailable

                why = compile_unavailable(device)
                if why is not None:
                    print(f"[{ctx.name}] compile: {why}; sampling eagerly", flush=True)
                    compiled = False
            actors = [actor_cls.remote(ref.location, env, device, spec.precision, weights,
                                       refiner["model_location"] if refiner else None,
                                       refiner["weights"] if refiner else "raw", compiled)
                      for _ in range(min(spec.actors, len(todo)))]
            done = sum(r.samples + len(r.rejects) for r in records.values())
            progress = Progress(ctx.name, total, what="samples", start=done)
            try:   # one shard per actor at a time: an actor is a slot
                for _job, record in fan_out(todo, lambda job, slot: actors[slot].run_shard.remote(job), len(actors)):
                    records[record.name] = record
                    done += record.samples + len(record.rejects)
                    if spec.progress:
                        progress.update(done, shard=record.name,
                                        samples_per_s=(done - progress.start) / max(time.time() - started, 1e-9))
            finally:
                for actor in actors:
                    ray.kill(actor)
        seconds = time.time() - started
        ordered = [records[j.shard] for j in jobs]
        names = list(dict.fromkeys(j.name for j in jobs))
        single = tokenizers[names[0]] if len(names) == 1 else None
        rejects = units.quarantine(ordered)
        if not sum(r.samples for r in ordered):
            raise UserError(f"all {total} samples were rejected ({rejects[0].reason})",
                            where=join(ctx.out_uri, "rejects.arrow"), fix="see rejects.arrow for the reasons; for octree (variable-length) models raise `length`")
        manifest = units.commit_store(
            ordered, vocab=jobs[0].store_vocab,
            tokenizer=(TokenizerRef(id=f"sampled:{single['tokenizer_digest'][:12]}", digest=single["tokenizer_digest"])
                       if single and single.get("tokenizer_digest") else None),
            metadata={"modality": single["modality"] if single else "mixed",
                      "tokenizer_uri": single["tokenizer_uri"] if single else None,
                      "tokenizer_layout": single["layout"] if single else None,
                      "tokenizers": {n: tokenizers[n] for n in names}, "model": spec.model,
                      "model_location": ref.location, "model_id": model_id, "registered_model": ref.registered,
                      "weights": weights, **({"refiner": refiner} if refiner else {}),
                      **({"control": _control_metadata(tokenizers["control"], vocab)} if spec.controls else {}),
                      "sampling": {k: v for k, v in spec.model_dump(mode="json").items()
                                   if k not in SampleSpec.runtime_fields}, "rejects": len(rejects)},
            known_files=ctx.known_files)
        store_uri = units.store_uri
        self._contact_sheets(store_uri, names, tokenizers)
        new = [records[j.shard] for j in todo]
        samples = sum(r.samples for r in ordered)
        ctx.log_metrics({"samples": samples, "rejects": len(rejects), "shards": len(jobs),
                         "shards_reused": len(jobs) - len(todo),
                         "forward_passes": sum(r.detail["forward_passes"] for r in ordered),
                         **({"refiner_passes": sum(r.detail["refiner_passes"] for r in ordered)} if refiner else {}),
                         "samples_per_s": sum(r.samples for r in new) / max(seconds, 1e-9),
                         "tokens_per_s": sum(r.tokens for r in new) / max(seconds, 1e-9)})
        print(f"[{ctx.name}] {samples} samples in {store_uri}, {len(rejects)} rejected; media in "
              f"{join(ctx.out_uri, 'media')}", flush=True)
        sheet = join(ctx.out_uri, "media", f"contact_{names[0] if len(names) == 1 else '<modality>'}.png")
        print(f"[{ctx.name}] contact sheet{'s' if len(names) > 1 else ''}"
              f"{' (' + ', '.join(names) + ')' if len(names) > 1 else ''}: {sheet} (also in MLflow under "
              "contact_sheets/)", flush=True)
        return {"samples": Output(path="samples", digest=manifest.digest), "media": Output(path="media")}

    def _contact_sheets(self, store_uri: str, names: list[str], tokenizers: dict[str, dict[str, Any]]) -> None:
        """``media/contact_<name>.png`` from the first samples of each modality, logged to MLflow."""
        import io

        from arpipe.stages.modalities import load_tokenizer
        from arpipe.stages.modalities.previews import contact_sheet
        from arpipe.stages.store import TokenStore

        store = TokenStore.open(store_uri)
        by_name: dict[str, list] = {n: [] for n in names}
        captions: dict[str, list[str | None]] = {n: [] for n in names}
        for i in range(len(store)):
            if all(len(t) >= CONTACT_SAMPLES for t in by_name.values()):
                break   # enough for every sheet: do not read the rest of the store
            sample = store[i]
            name = sample.key.rsplit("-", 1)[0]
            if len(by_name[name]) < CONTACT_SAMPLES:
                by_name[name].append(sample.tokens.reshape(-1))
                captions[name].append(sample.caption)
        for name, tokens in by_name.items():
            if not tokens:
                continue
            tok = load_tokenizer(tokenizers[name]["tokenizer_uri"])
            sheet = contact_sheet(tok.decode_arrays(tokens), tokenizers[name]["modality"], captions=captions[name])
            buf = io.BytesIO()
            sheet.save(buf, format="PNG")
            rel = f"media/contact_{name}.png"
            storage_for(self.ctx.out_uri).write_bytes(join(self.ctx.out_uri, rel), buf.getvalue())
            local = self.ctx.work_dir / CONTROL_DIR / f"contact_{name}.png"
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(buf.getvalue())
            self.ctx.log_artifact(local, "contact_sheets")
