"""Stage kind ``tokenize``: apply a tokenizer to a source on Ray, into a token store.

The source's reader lists partition units (files, tar shards, volume crop
regions, clip windows); each unit (an :class:`EncodeJob`) is read, encoded and
committed by one Ray task, or on GPUs by one call of a :class:`GpuEncoder`
actor: its shard(s), then its record ``.arpipe/units/u<n>.json``
(``stages.store.units``). A rerun reuses every unit whose record and shards are
in place, so a crash costs at most the units in flight. At most ``workers`` units (each with the stage's ``resources``, one CPU
by default) are in flight (backpressure: memory stays bounded however large the
source).

With ``resources.num_gpus`` > 0 a pool of ``workers`` actors each holds that
share of a GPU and its tokenizer encodes there, batch by batch, in full float32
(patch_vq, msvq, vqvae: those with a ``device`` runtime option); a tokenizer
without one (octree, codec) runs on the CPU and the stage says so in one line.
A request no node of the cluster can meet fails in one line
(``pipeline.remote.require_gpus``) instead of waiting for good.

A sample that fails to read or encode is quarantined in ``rejects.arrow``
(source, reason, stage, time); the stage fails only when rejects exceed
``max_reject_fraction``. Files below the source that the reader does not read
(other formats, hidden files, label sidecars) get a ``skipped: ...`` row there
too and are counted per kind in the log line and in MLflow, never as rejects:
every file is stored, quarantined or skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arpipe.pipeline.digest import listing_digest
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.progress import Progress
from arpipe.pipeline.stage import Output, Stage, StageContext, ray_resources
from arpipe.pipeline.storage import join, normalize
from arpipe.schemas.base import Resources
from arpipe.schemas.tokenize import ImageSource, Source
from arpipe.schemas.tokenize import TokenizeStage as TokenizeSpec

if TYPE_CHECKING:
    import numpy as np

    from arpipe.stages.modalities import Sample, Unit
    from arpipe.stages.modalities.base import SkippedFile
    from arpipe.stages.store import StoreUnits, UnitRecord

ENCODE_BATCH = 64
_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(uri: str, digest: str, device: str = "cpu"):
    """One loaded tokenizer per worker process, artifact and device (workers are reused across tasks).

    The driver read the artifact's digest once; a worker verifies and loads it only on a miss. ``device``
    reaches the tokenizers that take one (``runtime_options``); the others ignore it.
    """
    key = f"{uri}@{digest}@{device}"
    if key not in _TOKENIZERS:
        from arpipe.stages.modalities import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(uri, device=device)
    return _TOKENIZERS[key]


def unit_device(resources: Resources) -> str:
    """Where a unit's tokenizer runs: ``cuda`` (the GPU Ray gives the task) when the stage asks for GPUs,
    else ``cpu``, also on a node with GPUs (Ray 2.60 leaves a task that asked for none every GPU visible:
    it must not take one that another task holds)."""
    return "cuda" if resources.num_gpus > 0 else "cpu"


def unit_ray_options(resources: Resources) -> dict[str, Any]:
    """Ray options of what encodes the units: the stage's ``resources``, and on CPUs a plain task retried
    twice when cut off, on GPUs a :class:`GpuEncoder` actor restarted once (its unit then retried once)."""
    retries = {"max_restarts": 1, "max_task_retries": 1} if resources.num_gpus > 0 else {"max_retries": 2}
    return {**ray_resources(resources), **retries}


def unit_name(index: int) -> str:
    """A reader unit's name: its record is ``.arpipe/units/<name>.json``, its shards ``<name>-000``, ..."""
    return f"u{index:06d}"


@dataclass(frozen=True)
class ControlMaps:
    """Where a job's control maps come from: computed from each image (``transform`` canny or sobel), or read
    from ``source`` (``transform`` none), ``paired`` naming each of the job's images' map (image key -> the map's
    path below ``source.uri``; an image missing there has none and is quarantined)."""

    tokenizer_uri: str
    tokenizer_digest: str
    transform: str = "none"
    sigma: float = 1.0
    source: ImageSource | None = None
    paired: dict[str, str] = field(default_factory=dict)

    def maps(self, images: list[Sample]) -> list[np.ndarray | str]:
        """Each image's control map, or why it has none (a reason for its quarantine)."""
        from arpipe.stages.modalities import SampleError, Unit, open_reader
        from arpipe.stages.modalities.controls import control_image, name_key

        if self.source is None:
            return [control_image(s.data, self.transform, self.sigma) for s in images]
        reader = open_reader("image", self.source.uri, **self.source.reader_options())
        out: list[np.ndarray | str] = []
        for sample in images:
            rel = self.paired.get(sample.key)
            if rel is None:
                out.append(f"no control map named {name_key(sample.key)} below {self.source.uri}: add it there "
                           "(any image suffix), or move the image out of the source")
                continue
            try:
                [read] = reader.read(Unit(self.source.uri, "file", rel, members=(rel,)))
                out.append(read.data)
            except SampleError as err:
                out.append(f"its control map {err.source} does not read: {err.reason}")
        return out


@dataclass(frozen=True)
class EncodeJob:
    """One reader unit to encode on a Ray worker, with everything the worker needs to do it alone."""

    units: StoreUnits           # where the shards and the record go
    index: int                  # the unit's position in the reader's listing (= store order)
    unit: Unit
    source: Source              # the resolved source (its format inferred once by the driver)
    tokenizer_uri: str
    tokenizer_digest: str       # read once by the driver: a worker loads the artifact only on a miss
    text_tokenizer: tuple[str, str] | None   # (uri, digest) of the tokenizer of the captions, if any
    control: ControlMaps | None  # each image's control map and its tokenizer, if any
    samples_per_shard: int
    stage: str                  # named in the rejects
    device: str = "cpu"         # where the tokenizers encode (``unit_device``)

    @property
    def name(self) -> str:
        return unit_name(self.index)


def encoded_or_errors(tok, arrays: list[np.ndarray]) -> list[np.ndarray | Exception]:
    """Each array's tokens, encoded as one batch; when the batch fails, one by one, so that each culprit carries
    its own error and the rest are kept."""
    from arpipe.stages.modalities import TokenizerError

    try:
        return list(tok.encode_arrays(arrays))
    except (TokenizerError, ValueError, RuntimeError):
        out: list[np.ndarray | Exception] = []
        for array in arrays:
            try:
                out.append(tok.encode_arrays([array])[0])
            except (TokenizerError, ValueError, RuntimeError) as err:
                out.append(err)
        return out


def encode_unit(job: EncodeJob) -> UnitRecord:
    """Read, encode and commit one unit; returns (and writes last) its record."""
    import numpy as np

    from arpipe.stages.modalities import open_reader
    from arpipe.stages.modalities.accounting import read_quarantining
    from arpipe.stages.store import Reject, ShardWriter, UnitRecord

    source, unit, store_uri = job.source, job.unit, job.units.store_uri
    reader = open_reader(source.modality, source.uri, **source.reader_options())
    tok = _tokenizer(job.tokenizer_uri, job.tokenizer_digest, job.device)
    text_tok = _tokenizer(*job.text_tokenizer) if job.text_tokenizer else None
    control_tok = (_tokenizer(job.control.tokenizer_uri, job.control.tokenizer_digest, job.device)
                   if job.control else None)
    layout = tok.layout()
    # single-grid tokenizers (patch_vq, vqvae) store tokens in their grid shape; scales/octree stay flat
    grid = tuple(layout["grid"]) if "grid" in layout and "scales" not in layout else None
    shards: list[str] = []
    rejects: list[Reject] = []
    state = {"writer": None, "count": 0}
    samples = tokens = 0
    started = time.time()

    def writer() -> ShardWriter:
        if state["writer"] is None or state["count"] >= job.samples_per_shard:
            if state["writer"] is not None:
                state["writer"].commit()
            name = f"{job.name}-{len(shards):03d}"
            shards.append(name)
            state["writer"], state["count"] = ShardWriter(store_uri, name, vocab_size=tok.vocab_size), 0
        return state["writer"]

    def reject(source_uri: str, reason: str) -> None:
        rejects.append(Reject(source=source_uri, reason=reason, stage=job.stage, time=time.time()))

    def flush(batch: list) -> None:
        nonlocal samples, tokens
        if not batch:
            return
        pairs = []
        for sample, idx in zip(batch, encoded_or_errors(tok, [s.data for s in batch]), strict=True):
            if isinstance(idx, Exception):
                reject(f"{sample.source_uri}#{sample.key}", f"encode failed: {idx}")
            else:
                pairs.append((sample, idx))
        controls = [None] * len(pairs)
        if control_tok is not None and pairs:
            maps = job.control.maps([s for s, _idx in pairs])
            read = [k for k, m in enumerate(maps) if not isinstance(m, str)]
            codes = dict(zip(read, encoded_or_errors(control_tok, [maps[k] for k in read]), strict=True))
            kept, controls = [], []
            for k, (sample, idx) in enumerate(pairs):
                code = codes.get(k)
                if code is None or isinstance(code, Exception):
                    reject(f"{sample.source_uri}#{sample.key}",
                           maps[k] if code is None else f"its control map does not encode: {code}")
                else:
                    kept.append((sample, idx))
                    controls.append(code)
            pairs = kept
        captioned = [s.caption for s, _idx in pairs if s.caption is not None]
        caption_ids = iter(text_tok.encode_texts(captioned) if text_tok is not None and captioned else [])
        for (sample, idx), control in zip(pairs, controls, strict=True):
            condition = sample.label if sample.label is None or isinstance(sample.label, (int, str)) else str(sample.label)
            if grid is not None and int(np.prod(grid)) == idx.size:
                idx = idx.reshape(grid)
            writer().append(idx, key=sample.key, modality=sample.modality, condition=condition,
                            source_uri=sample.source_uri, source_digest=sample.source_digest, caption=sample.caption,
                            caption_tokens=next(caption_ids) if text_tok and sample.caption is not None else None,
                            control_tokens=control)
            state["count"] += 1
            samples += 1
            tokens += int(idx.size)
        batch.clear()

    batch: list = []
    for sample in read_quarantining(reader, unit, reject):
        batch.append(sample)
        if len(batch) >= ENCODE_BATCH:
            flush(batch)
    flush(batch)
    if state["writer"] is not None:
        state["writer"].commit()
    record = UnitRecord(name=job.name, fingerprint=job.units.fingerprint, shards=tuple(shards), samples=samples,
                        tokens=tokens, rejects=tuple(rejects), seconds=time.time() - started,
                        detail={"unit": unit.to_json()})
    job.units.write(record)
    return record


class GpuEncoder:
    """A Ray actor that encodes units on the share of a GPU it holds for its life.

    A plain task is the wrong vehicle for a GPU unit: Ray starts a new worker process for each GPU task
    (torch, CUDA and the tokenizer loaded anew for every unit, seconds against the milliseconds a batch
    takes), or, where a worker is reused, CUDA stays on the device of its first task whatever Ray assigns
    next. An actor gets its GPU once and keeps its tokenizers (``_tokenizer``) loaded across units.
    """

    def __init__(self, env: dict[str, str]):
        self.env = env

    def encode(self, job: EncodeJob) -> UnitRecord:
        return StageContext.with_env(self.env, encode_unit, job)


class TokenizeStage(Stage):
    kind = "tokenize"
    version = "1"
    placement = "driver"   # it fans out its own Ray tasks
    spec: TokenizeSpec

    @classmethod
    def source_digest(cls, spec: TokenizeSpec, pipeline_dir: Path) -> str | None:
        """The source's listing and, when the control maps are files of their own, theirs."""
        from arpipe.pipeline.digest import digest_bytes

        uris = [spec.source.uri] + ([spec.control.source.uri] if spec.control and spec.control.source else [])
        digests = [listing_digest(uri, pipeline_dir) for uri in uris]
        return digests[0] if len(digests) == 1 else digest_bytes("\n".join(digests).encode())

    def _control_maps(self, source: Source, listing: list[Unit], doc: dict[str, Any] | None
                      ) -> tuple[ControlMaps | None, dict[str, str], list[SkippedFile]]:
        """How the jobs get their images' control maps; with a ``control.source``, which map each image file pairs
        with (by name) and the maps that pair with none (reported as skipped)."""
        from arpipe.stages.modalities import open_reader
        from arpipe.stages.modalities.base import SkippedFile
        from arpipe.stages.modalities.controls import UNPAIRED, name_key, pair_by_name
        from arpipe.stages.modalities.image import as_size

        spec = self.spec.control
        if spec is None or doc is None:
            return None, {}, []
        control = ControlMaps(tokenizer_uri=spec.tokenizer, tokenizer_digest=doc["digest"],
                              transform=spec.transform or "none", sigma=spec.sigma)
        if spec.source is None:
            return control, {}, []
        # a map's label would go unused: no labels sidecar is looked for in the maps folder (once per batch)
        update: dict[str, Any] = {"uri": normalize(spec.source.uri, self.ctx.pipeline_dir), "labels": None}
        shape = [int(n) for n in (doc.get("config") or {}).get("input_shape") or []]
        if len(shape) == 3:   # the maps are read as the control tokenizer takes them
            given = spec.source.size
            if given is not None and list(as_size(given)) != shape[1:]:
                raise UserError(f"control.source.size {given} differs from the control tokenizer's input "
                                f"{shape[1]}x{shape[2]}", where=spec.tokenizer,
                                fix="remove control.source.size: maps are read at the control tokenizer's size")
            update.update(channels=shape[0], size=shape[1:])
        maps = spec.source.model_copy(update=update)
        reader = open_reader("image", maps.uri, **maps.reader_options())
        if getattr(source, "format", None) != "folder" or reader.format != "folder":
            raise UserError("control.source pairs image files with their maps by name, so both must be folders "
                            f"of image files (here {getattr(source, 'format', source.modality)} and "
                            f"{reader.format})", where=maps.uri,
                            fix="give source and control.source as folders of images, or use control.transform")
        try:
            paired, unpaired = pair_by_name([rel for unit in listing for rel in unit.members],
                                            [rel for unit in reader.units() for rel in unit.members])
        except ValueError as err:
            raise UserError(str(err), where=maps.uri, fix="keep one control map per image name") from None
        if not paired:
            raise UserError(f"no control map below {maps.uri} has the name of an image below {source.uri}",
                            where=maps.uri, fix="name each map as its image (same relative path, any image "
                                                "suffix)")
        skipped = [SkippedFile(join(maps.uri, rel), rel, UNPAIRED,
                               f"{UNPAIRED}: no image named {name_key(rel)} below {source.uri} to pair it with; add "
                               "the image, or remove the map") for rel in unpaired]
        return replace(control, source=maps.model_copy(update={"format": "folder"})), paired, [*reader.skipped,
                                                                                                *skipped]

    def _encode(self, todo: list[EncodeJob]) -> Iterator[tuple[EncodeJob, UnitRecord]]:
        """Each job with its record as it finishes, ``workers`` in flight, each with the stage's resources:
        plain Ray tasks on CPUs, a pool of ``workers`` :class:`GpuEncoder` actors when GPUs are asked for."""
        import ray

        from arpipe.stages.store import fan_out

        spec, env, options = self.spec, self.ctx.forwarded_env(), unit_ray_options(self.spec.resources)
        if not spec.resources.num_gpus:
            task = ray.remote(StageContext.with_env).options(**options, name=f"arpipe:{self.ctx.name}:unit")
            yield from fan_out(todo, lambda job, _slot: task.remote(env, encode_unit, job), spec.workers)
            return
        actors = [ray.remote(GpuEncoder).options(**options).remote(env) for _ in range(min(spec.workers, len(todo)))]
        try:   # one unit per actor at a time, an actor is a slot once placed: those Ray cannot place wait unused
            yield from fan_out(todo, lambda job, slot: actors[slot].encode.remote(job), len(actors),
                               ready=[actor.__ray_ready__.remote() for actor in actors])
        finally:
            for actor in actors:
                ray.kill(actor)

    def run(self) -> dict[str, Output]:
        from arpipe.pipeline.remote import require_gpus
        from arpipe.stages.modalities import Unit, open_reader, read_artifact, tokenizer_class
        from arpipe.stages.modalities.accounting import skip_metrics, skip_summary
        from arpipe.stages.store import Reject, StoreUnits, TokenizerRef

        spec, ctx = self.spec, self.ctx
        source = spec.source.model_copy(update={"uri": normalize(spec.source.uri, ctx.pipeline_dir)})
        tok_doc = read_artifact(spec.tokenizer)[0]
        if tok_doc["type"] == "text":
            raise UserError("tokenizer is a text tokenizer: it encodes captions, not the source's samples",
                            where=spec.tokenizer, fix="give it as text_tokenizer:, and a tokenizer of the "
                                                      f"{source.modality} modality as tokenizer:")
        text_doc = read_artifact(spec.text_tokenizer)[0] if spec.text_tokenizer else None
        control_doc = read_artifact(spec.control.tokenizer)[0] if spec.control else None
        if control_doc is not None and (source.modality != "image" or control_doc["type"] == "text"):
            raise UserError(f"control maps are computed from images by an image tokenizer, here a "
                            f"{control_doc['type']} tokenizer on a {source.modality} source", where=spec.control.tokenizer,
                            fix="give control: to an image source, with a tokenizer fitted on its control maps "
                                "(a tokenizer stage whose source sets transform:)")
        if text_doc is not None and text_doc["type"] != "text":
            raise UserError(f"text_tokenizer is a {text_doc['type']} tokenizer, not a text one",
                            where=spec.text_tokenizer, fix="point text_tokenizer at a tokenizer stage of type: text")
        if text_doc is not None and getattr(source, "captions", None) is None:
            raise UserError("text_tokenizer is set but the source reads no captions", where=source.uri,
                            fix="set source.captions (auto, beside or a sidecar path)")
        units = StoreUnits(out_uri=ctx.out_uri, store="store", fingerprint=ctx.fingerprint)
        reader = open_reader(source.modality, source.uri, **source.reader_options())
        listing = reader.units()
        skipped = reader.skipped   # known from the listing alone: the same on every rerun
        if not listing:
            raise UserError("the source has no data", where=source.uri, fix="check source.uri and its format")
        if "format" in type(source).model_fields and getattr(reader, "format", None):
            # inferred once here, not by listing the source per unit
            source = source.model_copy(update={"format": reader.format})
        control, paired, unpaired = self._control_maps(source, listing, control_doc)
        skipped = [*skipped, *unpaired]
        device = unit_device(spec.resources)
        jobs = [EncodeJob(units=units, index=i, unit=unit, source=source, tokenizer_uri=spec.tokenizer,
                          tokenizer_digest=tok_doc["digest"], samples_per_shard=spec.shards.samples_per_shard,
                          text_tokenizer=(spec.text_tokenizer, text_doc["digest"]) if text_doc else None,
                          control=control and replace(control, paired={rel: paired[rel] for rel in unit.members
                                                                       if rel in paired}),
                          stage=ctx.name, device=device) for i, unit in enumerate(listing)]
        # a record is reused only for the very unit it read (a listing that changed shape re-reads it)
        records = {job.name: r for job in jobs if (r := units.reusable(job.name)) is not None
                   and isinstance(d := r.detail.get("unit"), dict) and Unit.from_json(d) == job.unit}
        reused = len(records)
        todo = [job for job in jobs if job.name not in records]
        gpus = spec.resources.num_gpus
        print(f"[{ctx.name}] {len(jobs)} units from {source.uri}: {reused} reused, {len(todo)} to encode "
              f"with {spec.workers} worker(s)" + (f" on {device}, {gpus:g} GPU each" if gpus else ""), flush=True)
        if todo and gpus:
            if "device" not in tokenizer_class(tok_doc["type"]).runtime_options:
                print(f"[{ctx.name}] the {tok_doc['type']} tokenizer has nothing to run on a GPU: it encodes on "
                      f"the CPU, while each unit still holds the {gpus:g} GPU resources.num_gpus asks for (set it "
                      "to 0 to leave them to other work)", flush=True)
            require_gpus(gpus, where=f"stages.{ctx.name}.resources.num_gpus",
                         say=lambda line: print(f"[{ctx.name}] {line}", flush=True))
        started = time.time()
        progress = Progress(ctx.name, len(jobs), what="units", start=reused)
        encoded_samples = encoded_tokens = 0
        for job, record in self._encode(todo):
            records[job.name] = record
            encoded_samples += record.samples
            encoded_tokens += record.tokens
            if spec.progress:
                progress.update(len(records), samples=encoded_samples,
                                samples_per_s=encoded_samples / max(time.time() - started, 1e-9))
        seconds = time.time() - started
        ordered = [records[job.name] for job in jobs]
        samples = sum(r.samples for r in ordered)
        tokens = sum(r.tokens for r in ordered)
        listed_at = time.time()
        rejects = units.quarantine(ordered, skipped=[Reject.skipped(f.uri, f.reason, ctx.name, listed_at)
                                                     for f in skipped])
        ctx.log_metrics({"samples": samples, "tokens": tokens, "rejects": len(rejects), "units": len(jobs),
                         "units_reused": reused, **skip_metrics(skipped),
                         "samples_per_s": encoded_samples / max(seconds, 1e-9),
                         "tokens_per_s": encoded_tokens / max(seconds, 1e-9)})
        total = samples + len(rejects)
        if total and len(rejects) / total > spec.max_reject_fraction:
            raise UserError(f"{len(rejects)} of {total} samples rejected ({len(rejects) / total:.2%}), more than "
                            f"max_reject_fraction {spec.max_reject_fraction:g}; reasons are in "
                            f"{join(ctx.out_uri, 'rejects.arrow')}", where=source.uri,
                            fix="fix or remove the bad files, or raise max_reject_fraction")
        if samples == 0:
            raise UserError("no sample could be tokenized", where=source.uri, fix="see rejects.arrow for reasons")
        manifest = units.commit_store(
            ordered, vocab=tok_doc["vocab_size"],
            tokenizer=TokenizerRef(id=f"{tok_doc['type']}:{tok_doc['digest'][:12]}", digest=tok_doc["digest"]),
            metadata={"modality": source.modality, "source_uri": source.uri,
                      "source_digest": listing_digest(source.uri, ctx.pipeline_dir),
                      "tokenizer_uri": spec.tokenizer, "tokenizer_layout": tok_doc.get("layout"),
                      "tokens_per_sample": tok_doc.get("tokens_per_sample"),
                      "rejects": len(rejects), "units": len(jobs),
                      **({"text_tokenizer": {"id": f"text:{text_doc['digest'][:12]}", "digest": text_doc["digest"],
                                             "uri": spec.text_tokenizer, "vocab_size": text_doc["vocab_size"]}}
                         if text_doc else {}),
                      **({"control": {"transform": control.transform, "sigma": spec.control.sigma,
                                      **({"source": control.source.uri} if control.source else {}),
                                      "id": f"{control_doc['type']}:{control_doc['digest'][:12]}",
                                      "digest": control_doc["digest"], "uri": spec.control.tokenizer,
                                      "vocab_size": control_doc["vocab_size"]}} if control_doc else {})},
            known_files=ctx.known_files)
        # one write with its newline: stages running beside this one print to the same stdout
        print(f"[{ctx.name}] store {units.store_uri}: {samples} samples, {tokens} tokens, {len(rejects)} rejected, "
              f"{skip_summary(skipped)}, {reused} of {len(jobs)} units reused"
              + (f"; reasons in {join(ctx.out_uri, 'rejects.arrow')}" if rejects or skipped else "") + "\n",
              end="", flush=True)
        return {"store": Output(path="store", digest=manifest.digest)}

