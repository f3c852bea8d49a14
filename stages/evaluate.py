"""Stage kind ``evaluate``: score a model and its samples on a Ray actor pool; output ``metrics``.

Independent parts, each run when its inputs are given:

- **likelihood** (``model`` + ``heldout``): per-sample negative log-likelihood
  of a token store under the model, summarized as mean NLL per token and bits
  per token (a ``masked`` model's is that of decoding one token a step in
  raster order, ``maskgit.sequential_nll``);
- **reconstruction** (``reconstruction``): the tokenizer's round trip on real
  data: PSNR and SSIM (images, video, volumes), Chamfer distance (point clouds);
- **samples** (``samples`` + ``reference``): generated samples against the
  reference store, both decoded through their tokenizers. Images: FID, KID,
  precision and recall in the feature space of ``features.image``; video: FVD
  with ``features.video``; point clouds: MMD, COV and 1-NNA under Chamfer and
  EMD. Without a feature network the stage says which metrics it skipped and
  why, and computes the rest. Intensity mean and spread of every decoded
  sample (both sets) are always scored: they need no network;
- **classification** (``samples`` + ``classifier``): the Classification Accuracy
  Score: a classifier fitted on real data (``classifier.image``, ``.volume``,
  ``.pointcloud``) judges whether each class-conditional sample shows the class
  it was drawn for; scored on the reference too, so the judge's own accuracy
  is in the report;
- **attributes** (``samples`` + ``prompt_attributes``): in matched pairs of
  prompted samples ("a thick seven", "a thin seven"), the share where the
  sample asked for more of a measured attribute (``ink``, ``slant``) has more;
- **control agreement** (``samples`` + ``control_agreement``): the correlation
  of each controlled sample's edges with its control map, and with another
  sample's (``stages.evaluation.conditions``).

**Map, then reduce.** The work that grows with the samples is a map over
resumable units of ``samples_per_unit`` samples (``stages.store.units``) on a pool
of ``actors`` Ray actors (:class:`EvaluateWorker`, each with ``resources``):
*score* units decode a chunk of one store's selected samples through its
tokenizer and score them (intensities, features of the feature network, the
classifier's verdicts, prompt attribute measures; point clouds keep their
decoded clouds), *NLL* units score a chunk of a held-out store under the model.
The driver commits each unit as it arrives (``.arpipe/units/<unit>.json``,
written last, beside its ``.npz``), then reduces the units one at a time, in
order: per-sample rows stream into ``scores.parquet``, features fold into
:class:`~arpipe.stages.evaluation.Moments` (count, mean, centred scatter: FID and
FVD of any number of samples, equal to the stacked computation to float64
rounding), NLL into sums, verdicts into confusion counts. Only the pairwise
metrics (KID, precision/recall, point-cloud MMD/COV/1-NNA and each sample's
nearest reference) keep a bounded subset: ``pairwise_samples`` spread evenly over
each set. So the driver's memory does not grow with the number of samples, a
rerun reuses every committed unit (a crash costs at most the units in flight),
and the metrics are the same whether units were reused or not, and whatever the
number of actors.

A set is at most ``max_samples`` samples per modality, taken evenly over a store
that has more (stores written from class folders hold one class after another).

``metrics/`` holds ``metrics.json`` (the summary, also logged to MLflow with
``/`` in names, e.g. ``image/fid``), ``scores.parquet`` (one row per sample
and score: set, key, modality, metric, value), ``scores.png`` (their
distributions) and ``cas_<modality>.png`` (the classifier's confusion matrices).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import time
from array import array as doubles_array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from arpipe.pipeline.digest import digest_bytes
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.progress import Progress
from arpipe.pipeline.stage import Output, Stage, StageContext
from arpipe.schemas.base import REF_PATTERN
from arpipe.schemas.sample import EvaluateStage as EvaluateSpec

CLOUD_POINTS = 512   # points per cloud for Chamfer-based metrics (subsampled, seeded)
EMD_CLOUDS, EMD_POINTS = 24, 256   # exact EMD is an assignment problem: cheaper sets for its metrics
ROWS_PER_GROUP = 1 << 16   # per-sample rows buffered before a Parquet row group is written


class Scores:
    """Per-sample rows, streamed to ``scores.parquet`` as the parts add them, and the summary values."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.summary: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.plots: list[Path] = []   # PNGs beside metrics.json, also logged to MLflow
        #: every score's values, by "<modality> <metric> (<set>)", for the distributions plot (8 bytes a value)
        self.values: dict[str, doubles_array] = {}
        self._rows: list[tuple[str, str, str, str, float]] = []
        self._writer = None

    def add(self, set_: str, keys: list[str], modality: str, metric: str, values) -> None:
        values = [float(v) for v in values]
        self._rows += [(set_, k, modality, metric, v) for k, v in zip(keys, values, strict=True)]
        self.values.setdefault(f"{modality} {metric} ({set_})", doubles_array("d")).extend(values)
        if len(self._rows) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = list(zip(*self._rows)) if self._rows else [[], [], [], [], []]
        table = pa.table({"set": pa.array(cols[0], pa.string()), "key": pa.array(cols[1], pa.string()),
                          "modality": pa.array(cols[2], pa.string()), "metric": pa.array(cols[3], pa.string()),
                          "value": pa.array(cols[4], pa.float64())})
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)
        self._rows = []

    def close(self) -> None:
        """Write the rows still buffered and finish the file (an empty table when no part scored a sample)."""
        if self._rows or self._writer is None:
            self._flush()
        self._writer.close()


class Decoded(NamedTuple):
    """Samples of one modality of a store, decoded: keys, arrays, class labels (None: unconditional),
    captions (the prompts of prompted samples; None without one), control-map tokens (None without one) and
    where each sample is in its store."""

    keys: list[str]
    arrays: list[Any]
    conditions: list[str | None]
    captions: list[str | None] | None = None
    controls: list[tuple[int, ...] | None] | None = None
    indices: list[int] | None = None


def prompt_class(caption: str | None, words: dict[str, str]) -> str | None:
    """The class whose word (``words``: label -> word) the caption names, as a whole word; None when it names
    no class or several."""
    if not caption:
        return None
    said = set(re.findall(r"[\w']+", caption.lower()))
    named = [label for label, word in words.items() if word.lower() in said]
    return named[0] if len(named) == 1 else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` indices of ``range(n)`` evenly over it, in order (all of them when ``count >= n``)."""
    if count >= n:
        return list(range(n))
    return sorted({k * n // count for k in range(count)})


# ---------------------------------------------------------------------------- the map: units on actors


@dataclass(frozen=True)
class ScoreJob:
    """One score unit: the samples ``indices`` of the store ``store``, of one ``modality``, that the tokenizer
    at ``tokenizer_uri`` decodes."""

    unit: str
    store: str
    modality: str
    tokenizer_uri: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class NllJob:
    """One NLL unit: the samples ``indices`` of the held-out store ``store``, in the model's vocabulary ``name``."""

    unit: str
    store: str
    name: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Scorers:
    """What each actor loads once, by what the config asks for: the model (held-out NLL), the feature networks
    (kind, path, input size), the classifiers (modality, path) and the prompt attributes' measures."""

    model_location: str | None = None
    features: tuple[tuple[str, str, int | None], ...] = ()
    classifiers: tuple[tuple[str, str], ...] = ()
    classifier_image_size: int | None = None
    measures: tuple[str, ...] = ()
    batch_size: int = 32


@dataclass(frozen=True)
class UnitResult:
    """What an actor hands back for a unit: what its record keeps (JSON values: keys, labels, captions,
    verdicts, NLLs), its side file (an ``.npz`` of per-sample scores, features and clouds; None for NLL units)
    and how long it took."""

    kept: dict[str, Any]
    payload: bytes | None
    seconds: float


def features_by_shape(extractor, arrays: list) -> Any:
    """The extractor's features of ``arrays`` in their order; samples of several sizes (a flexvq store) are
    batched one size at a time (the extractor resizes each batch to its input)."""
    import numpy as np

    from arpipe.stages.modalities.base import by_shape

    groups = by_shape(arrays)
    if len(groups) == 1:
        return extractor.features(np.stack(arrays).astype(np.float32))
    out = None
    for _shape, at in groups:
        part = extractor.features(np.stack([arrays[i] for i in at]).astype(np.float32))
        if out is None:
            out = np.empty((len(arrays), *part.shape[1:]), dtype=part.dtype)
        out[at] = part
    return out


class EvaluateWorker:
    """One scoring replica in a Ray actor: decodes and scores units of samples, and held-out NLL units."""

    def __init__(self, scorers: Scorers, env: dict[str, str], device: str, threads: int) -> None:
        import torch

        os.environ.update(env)
        torch.set_num_threads(max(1, threads))
        self.scorers, self.device = scorers, device
        self._opened = None   # the model, loaded at the first NLL unit
        self._plans: dict[tuple[str, int], Any] = {}
        self._loaded: dict[str, Any] = {}

    def run(self, job: ScoreJob | NllJob) -> UnitResult:
        started = time.time()
        kept, payload = self._nll(job) if isinstance(job, NllJob) else self._score(job)
        return UnitResult(kept, payload, time.time() - started)

    def _cached(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    def _store(self, uri: str):
        from arpipe.stages.store import TokenStore

        return self._cached(f"store:{uri}", lambda: TokenStore.open(uri))

    def _score(self, job: ScoreJob) -> tuple[dict[str, Any], bytes]:
        import numpy as np

        from arpipe.stages.evaluation import MEASURES, FeatureExtractor
        from arpipe.stages.modalities import load_tokenizer

        store, s = self._store(job.store), self.scorers
        samples = [store[i] for i in job.indices]
        tok = self._cached(f"tokenizer:{job.tokenizer_uri}", lambda: load_tokenizer(job.tokenizer_uri,
                                                                                          device=self.device))
        arrays = [np.asarray(a) for a in tok.decode_arrays([x.tokens.reshape(-1) for x in samples])]
        kept: dict[str, Any] = {"keys": [x.key for x in samples],
                                "conditions": [None if x.condition is None else str(x.condition) for x in samples],
                                "captions": [x.caption for x in samples]}
        side: dict[str, Any] = {}
        if job.modality == "pointcloud":
            side.update((f"cloud_{k}", np.asarray(a, dtype=np.float64)) for k, a in enumerate(arrays))
        else:   # what the media files show: intensities in [0, 1]
            arrays = [np.clip(a, 0.0, 1.0) for a in arrays]
            side["intensity_mean"] = np.asarray([np.mean(a) for a in arrays], dtype=np.float64)
            side["intensity_std"] = np.asarray([np.std(a) for a in arrays], dtype=np.float64)
        for kind, path, size in s.features:
            if kind == job.modality:
                extractor = self._cached(f"features:{path}", lambda path=path, kind=kind, size=size: (
                    FeatureExtractor.load(path, kind=kind, input_size=size, device=self.device)))
                side["features"] = features_by_shape(extractor, arrays)
        if job.modality == "image":
            for measure in s.measures:
                side[f"measure_{measure}"] = np.asarray([MEASURES[measure](x) for x in arrays], dtype=np.float64)
        for modality, path in s.classifiers:
            if modality == job.modality:
                judge = self._cached(f"judge:{path}", lambda path=path: load_judge(path))
                with _as_user_error(path):
                    size = s.classifier_image_size if modality == "image" else None
                    kept["predicted"] = judge.predict(modality, arrays, image_size=size)
                    kept["classes"] = judge.classes
        buf = io.BytesIO()
        np.savez(buf, **side)
        return kept, buf.getvalue()

    def _nll(self, job: NllJob) -> tuple[dict[str, Any], None]:
        """Per-sample summed NLL (nats) of ``job.indices`` in batches of ``batch_size``, and token counts."""
        import numpy as np
        import torch

        from arpipe.stages.models import batch_inputs, level_inputs, sequential_nll
        from arpipe.stages.models.folder import open_model, plan_for_modality

        if self._opened is None:
            self._opened = open_model(self.scorers.model_location, device=self.device)
        opened, store, batch = self._opened, self._store(job.store), self.scorers.batch_size
        config, vocab, model = opened.config, opened.vocab, opened.model
        info = opened.tokenizers[job.name]
        keys, nll, counts = [], [], []
        with torch.no_grad():
            for lo in range(0, len(job.indices), batch):
                samples = [store[i] for i in job.indices[lo:lo + batch]]
                for length in sorted({int(x.tokens.size) for x in samples}):
                    group = [x for x in samples if int(x.tokens.size) == length]
                    if (job.name, length) not in self._plans:
                        self._plans[job.name, length] = plan_for_modality(
                            config, dict(info.get("layout") or {}), length, opened.scale_inputs.get(job.name))
                    plan = self._plans[job.name, length]
                    targets = torch.stack([vocab.to_global(job.name, torch.from_numpy(
                        x.tokens.reshape(-1).astype(np.int64))) for x in group]).to(self.device)
                    context = torch.tensor([vocab.context_of(job.name, x) for x in group], dtype=torch.long,
                                           device=self.device)
                    if config.paradigm == "masked":   # decoded one token a step in raster order (maskgit.py)
                        nll += sequential_nll(model, plan, targets, context).tolist()
                    else:   # a next_level model lays each octree out by its own levels (levels.py)
                        inputs = (level_inputs(plan, targets, context, vocab.code_range(job.name)[0])
                                  if config.paradigm == "next_level" else batch_inputs(plan, targets, context))
                        logits, _ = model(inputs.input_ids, inputs.coords, inputs.group_ids,
                                          features_BLD=inputs.features, feature_mask_BL=inputs.feature_mask)
                        ce = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), inputs.target_ids,
                                                               ignore_index=-100, reduction="none")
                        nll += ce.sum(1).tolist()
                    counts += [length] * len(group)
                    keys += [x.key for x in group]
        return {"keys": keys, "nll": nll, "counts": counts}, None


# ---------------------------------------------------------------------------- the reduce


@dataclass
class Reduced:
    """One modality of one set (samples or reference), reduced over its units in order: bounded however many
    samples, but for the captions and measures that prompt attributes pair up (kept only when asked for)."""

    count: int = 0
    intensity_sum: float = 0.0
    moments: Any = None                                           # Moments of the features (FID, FVD)
    subset_keys: list[str] = field(default_factory=list)          # the pairwise subset, in order
    subset_features: list[Any] = field(default_factory=list)
    subset_clouds: list[Any] = field(default_factory=list)
    verdicts: Counter = field(default_factory=Counter)            # (requested, predicted) -> samples
    classes: list[str] = field(default_factory=list)              # the judge's, in its output order
    refused: UserError | None = None                              # a class of the set the judge does not know
    unlabelled: int = 0                                           # samples with no class to check
    keys: list[str] = field(default_factory=list)                 # with prompt attributes only
    captions: list[str | None] = field(default_factory=list)
    measures: dict[str, list[float]] = field(default_factory=dict)


class EvaluateStage(Stage):
    kind = "evaluate"
    version = "2"   # 2: sets spread over large stores, pairwise metrics on a bounded subset, units on actors
    placement = "driver"   # it runs its own actor pool
    spec: EvaluateSpec

    def __init__(self, spec: EvaluateSpec, ctx: StageContext) -> None:
        super().__init__(spec, ctx)
        self._unit_counts = {"done": 0, "reused": 0}
        self._model: tuple[str, Any] | None = None   # (location, tokenizers) of the model scored
        self._sets: dict[str, dict[str, list[ScoreJob]]] = {}   # "samples"/"reference" -> modality -> units
        self._nll_jobs: dict[str, list[NllJob]] = {}            # held-out store -> units

    # ------------------------------------------------------------------ resumable units

    def _unit(self, name: str, work: dict[str, Any],
              make: Callable[[], tuple[dict[str, Any], bytes | None]]) -> tuple[dict[str, Any], bytes | None]:
        """A unit done here, in the driver (control agreement's decodes): reuse the committed unit ``name`` when
        it did this ``work``, else do it: ``make()`` returns what to keep in the record and an optional side file."""
        from arpipe.pipeline.storage import join, storage_for

        record = self._committed(name, work)
        if record is not None:
            self._unit_counts["reused"] += 1
            kept = {k: v for k, v in record.detail.items() if k != "work"}
            side = next(iter(record.files), None)
            return kept, storage_for(self.ctx.out_uri).read_bytes(join(self.ctx.out_uri, side)) if side else None
        started = time.time()
        kept, payload = make()
        self._commit(name, work, UnitResult(kept, payload, time.time() - started))
        self._unit_counts["done"] += 1
        return kept, payload

    def _units(self):
        from arpipe.stages.store import StoreUnits

        return StoreUnits(out_uri=self.ctx.out_uri, store="", fingerprint=self.ctx.fingerprint)

    @staticmethod
    def _work(job: ScoreJob | NllJob) -> dict[str, Any]:
        return {"store": job.store, "indices": list(job.indices)}

    def _committed(self, name: str, work: dict[str, Any]):
        """The unit's record when this fingerprint committed it for this ``work`` (a store and its sample
        indices), else None."""
        record = self._units().reusable(name)
        return record if record is not None and record.detail.get("work") == work else None

    def _commit(self, name: str, work: dict[str, Any], result: UnitResult) -> None:
        """Commit a unit: its side file, then its record."""
        from arpipe.pipeline.storage import join, storage_for
        from arpipe.stages.store import UnitRecord

        units, files = self._units(), {}
        if result.payload is not None:
            side = units.side_file(name, ".npz")
            storage_for(self.ctx.out_uri).write_bytes(join(self.ctx.out_uri, side), result.payload)
            files[side] = (len(result.payload), digest_bytes(result.payload))
        units.write(UnitRecord(name=name, fingerprint=self.ctx.fingerprint, shards=(), samples=len(work["indices"]),
                               tokens=0, files=files, seconds=result.seconds, detail={"work": work, **result.kept}))

    def _load(self, job: ScoreJob | NllJob) -> tuple[dict[str, Any], dict[str, Any]]:
        """A committed unit's record detail and side arrays."""
        import numpy as np

        from arpipe.pipeline.storage import join, storage_for

        record = self._committed(job.unit, self._work(job))
        if record is None:
            raise RuntimeError(f"unit {job.unit} of {self.ctx.name} was not committed")   # the map commits all
        arrays: dict[str, Any] = {}
        for rel in record.files:
            with np.load(io.BytesIO(storage_for(self.ctx.out_uri).read_bytes(join(self.ctx.out_uri, rel))),
                         allow_pickle=False) as npz:
                arrays.update((k, npz[k]) for k in npz.files)
        return record.detail, arrays

    def _scorers(self) -> Scorers:
        from arpipe.pipeline.storage import normalize

        spec, where = self.spec, self.ctx.pipeline_dir
        f = spec.features
        features = tuple((kind, normalize(uri, where), size) for kind, uri, size in
                         (("image", f.image, f.image_size), ("video", f.video, f.video_size)) if uri)
        return Scorers(model_location=self._model[0] if self._model else None, features=features,
                       classifiers=tuple((m, normalize(u, where)) for m, u in spec.classifier.files().items()),
                       classifier_image_size=spec.classifier.image_size,
                       measures=tuple(dict.fromkeys(a.measure for a in spec.prompt_attributes or ())),
                       batch_size=spec.batch_size)

    def map_units(self, jobs: list[ScoreJob | NllJob]) -> None:
        """Every unit not committed yet, on the actor pool; each is committed as it arrives."""
        import ray

        from arpipe.stages.store import fan_out

        spec, ctx = self.spec, self.ctx
        unique = list({j.unit: j for j in jobs}.values())   # samples and reference may share a store
        todo = [j for j in unique if self._committed(j.unit, self._work(j)) is None]
        self._unit_counts = {"done": len(todo), "reused": len(unique) - len(todo)}
        print(f"[{ctx.name}] {len(unique)} units of up to {spec.samples_per_unit} samples ({len(unique) - len(todo)} "
              f"reused) on {min(spec.actors, max(len(todo), 1))} actor(s)", flush=True)
        if not todo:
            return
        res = spec.resources
        threads = max(1, int(res.num_cpus))
        options: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_restarts": 1,
                                   "max_task_retries": 1}
        if res.memory:
            options["memory"] = res.memory
        actor_cls = ray.remote(EvaluateWorker).options(**options)
        env = {**ctx.forwarded_env(), "OMP_NUM_THREADS": str(threads)}
        scorers = self._scorers()
        device = "cuda" if res.num_gpus > 0 else "cpu"
        if res.num_gpus > 0:   # Ray would keep actors that no node can hold pending for good
            from arpipe.pipeline.remote import require_gpus

            require_gpus(res.num_gpus, where=f"stages.{ctx.name}.resources.num_gpus",
                         say=lambda line: print(f"[{ctx.name}] {line}", flush=True))
        actors = [actor_cls.remote(scorers, env, device, threads) for _ in range(min(spec.actors, len(todo)))]
        progress = Progress(ctx.name, len(todo), what="units")
        started = time.time()
        try:   # one unit per actor at a time: an actor is a slot
            for done, (job, result) in enumerate(
                    fan_out(todo, lambda job, slot: actors[slot].run.remote(job), len(actors),
                            ready=[actor.__ray_ready__.remote() for actor in actors]), 1):
                self._commit(job.unit, self._work(job), result)
                progress.update(done, unit=job.unit, units_per_s=done / max(time.time() - started, 1e-9))
        finally:
            for actor in actors:
                ray.kill(actor)

    # ------------------------------------------------------------------ planning

    def _selection(self, uris: list[str]) -> dict[str, list[tuple[str, str, list[int]]]]:
        """Per modality, the samples a set scores: ``(store, tokenizer uri, indices)`` per store, at most
        ``max_samples`` per modality over the stores in order, spread evenly over a store that has more."""
        from arpipe.stages.store import TokenStore

        limit = self.spec.max_samples
        out: dict[str, list[tuple[str, str, list[int]]]] = {}
        for uri in uris:
            store = TokenStore.open(uri)
            meta = store.manifest.metadata or {}
            mixed = "tokenizers" in meta
            tokenizers = meta.get("tokenizers") or {meta.get("modality"): {"tokenizer_uri": meta.get("tokenizer_uri"),
                                                                           "modality": meta.get("modality")}}
            room = {info.get("modality"): limit - sum(len(ix) for *_r, ix in out.get(info.get("modality"), []))
                    for info in tokenizers.values()}
            picked: dict[str, list[int]] = {}   # tokenizer name -> indices
            if not mixed:   # one modality: the indices alone, no sample read
                name = next(iter(tokenizers))
                picked[name] = spread_indices(len(store), max(room[tokenizers[name].get("modality")], 0))
            else:   # `limit` indices evenly over the store first, then the rest (other modalities' room)
                first = spread_indices(len(store), limit)
                taken = set(first)
                for i in itertools.chain(first, (i for i in range(len(store)) if i not in taken)):
                    if all(r <= 0 for r in room.values()):
                        break   # every modality has its samples: do not read the rest of a large store
                    name = store[i].key.rsplit("-", 1)[0]
                    modality = (tokenizers.get(name) or {}).get("modality")
                    if modality is None:
                        raise UserError(f"sample {store[i].key!r}: the store does not name the tokenizer that "
                                        "decodes it", where=uri, fix="evaluate stores written by tokenize or "
                                                                     "sample stages")
                    if room[modality] > 0:
                        picked.setdefault(name, []).append(i)
                        room[modality] -= 1
            for name, indices in picked.items():
                info = tokenizers[name]
                if not info.get("tokenizer_uri"):
                    raise UserError(f"the store does not name the tokenizer that decodes its {name} samples",
                                    where=uri, fix="evaluate stores written by tokenize or sample stages")
                if indices:
                    out.setdefault(info["modality"], []).append((uri, info["tokenizer_uri"], sorted(indices)))
        return out

    def _plan(self) -> list[ScoreJob | NllJob]:
        """The units of every part: NLL units of the held-out stores, score units of the sample and reference
        sets."""
        from arpipe.pipeline.models import resolve_model
        from arpipe.stages.models.folder import fetch_model, model_info, vocab_name_of_store
        from arpipe.stages.store import TokenStore

        spec, jobs = self.spec, []
        size = spec.samples_per_unit
        if spec.model:
            location = resolve_model(spec.model, self.ctx.tracking_uri, where=f"stages.{self.ctx.name}.model").location
            _config, _vocab, tokenizers = model_info(fetch_model(location), location=location)
            self._model = (location, tokenizers)
            for uri in spec.heldout or spec.reference:
                store = TokenStore.open(uri)
                name = vocab_name_of_store(tokenizers, store, uri)
                picked = spread_indices(len(store), spec.max_samples)
                self._nll_jobs[uri] = [NllJob(f"nll-{_tag(uri)}-{lo:06d}", uri, name, tuple(picked[lo:lo + size]))
                                       for lo in range(0, len(picked), size)]
                jobs += self._nll_jobs[uri]
        if spec.samples and (spec.reference or spec.classifier.files() or spec.prompt_attributes):
            for role, uris in (("samples", [spec.samples]), ("reference", spec.reference)):
                by_modality = self._sets.setdefault(role, {})
                for modality, parts in self._selection(uris).items():
                    for uri, tokenizer_uri, indices in parts:
                        for lo in range(0, len(indices), size):
                            chunk = tuple(indices[lo:lo + size])
                            unit = f"score-{_tag(uri)}-{lo // size:05d}-{_tag(json.dumps(chunk))}"
                            by_modality.setdefault(modality, []).append(
                                ScoreJob(unit, uri, modality, tokenizer_uri, chunk))
                jobs += [j for js in by_modality.values() for j in js]
        return jobs

    @classmethod
    def source_digest(cls, spec: EvaluateSpec, pipeline_dir: Path) -> str | None:
        """Feature networks and the reconstruction source are read from outside the pipeline."""
        from arpipe.pipeline.digest import digest_bytes, listing_digest

        uris = [u for u in (spec.features.image, spec.features.video) if u]
        # a classifier that is an upstream output is in the fingerprint by its content digest already
        uris += [u for u in spec.classifier.files().values() if not REF_PATTERN.search(u)]
        if spec.reconstruction:
            uris.append(spec.reconstruction.source.uri)
        parts = [listing_digest(u, pipeline_dir) for u in uris]
        from arpipe.pipeline.models import is_model_uri, resolve_model

        if spec.model and is_model_uri(spec.model):   # the version an alias names now
            parts.append(resolve_model(spec.model, where="model").key)
        return digest_bytes("\n".join(parts).encode()) if parts else None

    # ------------------------------------------------------------------ likelihood

    def _model_id(self) -> str | None:
        """The MLflow logged model evaluated: the one ``model`` names, else the one the samples came from."""
        from arpipe.pipeline.models import resolve_model

        spec = self.spec
        if spec.model and (found := resolve_model(spec.model, self.ctx.tracking_uri).model_id):
            return found
        if spec.samples:
            from arpipe.stages.store import TokenStore

            return (TokenStore.open(spec.samples).manifest.metadata or {}).get("model_id")
        return None


    def likelihood(self, scores: Scores) -> None:
        _location, tokenizers = self._model
        nll_all, count_all = 0.0, 0
        for uri, jobs in self._nll_jobs.items():
            nll_sum, counts_sum, samples = 0.0, 0, 0
            name = jobs[0].name if jobs else None
            modality = tokenizers[name]["modality"] if name else "unknown"
            for job in jobs:   # in order: the same sums whichever units were reused
                detail, _ = self._load(job)
                keys, nll, counts = detail["keys"], detail["nll"], detail["counts"]
                scores.add("heldout", keys, modality, "nll", nll)
                scores.add("heldout", keys, modality, "bits_per_token",
                           [v / c / math.log(2) for v, c in zip(nll, counts, strict=True)])
                nll_sum += math.fsum(nll)
                counts_sum += sum(counts)
                samples += len(keys)
            if not counts_sum:
                scores.skipped[f"heldout/{uri}"] = "the held-out store has no samples"
                continue
            per_token = nll_sum / counts_sum
            scores.summary[f"heldout/{name}/bits_per_token"] = per_token / math.log(2)
            nll_all, count_all = nll_all + nll_sum, count_all + counts_sum
            print(f"[{self.ctx.name}] held-out {name}: {per_token:.4f} nats/token = "
                  f"{per_token / math.log(2):.4f} bits/token over {samples} samples of {uri}", flush=True)
        if not count_all:
            raise UserError("the held-out stores have no samples to score", where=f"stages.{self.ctx.name}.heldout",
                            fix="give a token store with samples (heldout, or reference)")
        per_token = nll_all / count_all
        scores.summary.update({"heldout/nll_per_token": per_token, "heldout/bits_per_token": per_token / math.log(2),
                               "heldout/tokens": float(count_all)})

    def reconstruction(self, scores: Scores) -> None:
        import numpy as np

        from arpipe.pipeline.storage import normalize
        from arpipe.stages.modalities import load_tokenizer, open_reader
        from arpipe.stages.modalities.metrics import round_trip

        rec = self.spec.reconstruction
        tok = load_tokenizer(rec.tokenizer, device="cpu")
        source = rec.source
        reader = open_reader(source.modality, normalize(source.uri, self.ctx.pipeline_dir), **source.reader_options())
        samples = list(itertools.islice(iter(reader), rec.max_samples))
        if not samples:
            raise UserError("the reconstruction source has no samples", where=source.uri, fix="check its uri")
        keys = [s.key for s in samples]
        modality = source.modality
        decoded = tok.decode_arrays(tok.encode_arrays([s.data for s in samples]))
        # the tokenizer stage's fit report scores its held-out round trip with the same function
        for metric, values in round_trip(modality, [s.data for s in samples], decoded).items():
            scores.add("reconstruction", keys, modality, metric, values)
            scores.summary[f"reconstruction/{metric}"] = float(np.mean(values))
        if modality == "pointcloud":
            return
        print(f"[{self.ctx.name}] tokenizer round trip on {len(keys)} {modality} samples: PSNR "
              f"{scores.summary['reconstruction/psnr']:.2f} dB", flush=True)


    # ------------------------------------------------------------------ samples

    def _decoded(self, uri: str, limit: int) -> dict[str, Decoded]:
        """The first ``limit`` samples of each modality of a store, decoded in the driver (control agreement,
        which pairs samples across units)."""
        import numpy as np

        from arpipe.stages.store import TokenStore

        store = TokenStore.open(uri)
        meta = store.manifest.metadata or {}
        tokenizers = meta.get("tokenizers") or {meta.get("modality"): {"tokenizer_uri": meta.get("tokenizer_uri"),
                                                                       "modality": meta.get("modality")}}
        picked: dict[int, tuple[str, Any]] = {}   # store index -> (tokenizer name, tokens)
        tokens: dict[str, tuple[list[str], list[int]]] = {}
        conditions: dict[str, list[str | None]] = {}
        captions: dict[str, list[str | None]] = {}
        controls: dict[str, list[tuple[int, ...] | None]] = {}
        wanted = {t.get("modality") for t in tokenizers.values()}
        for i in range(len(store)):
            if len(tokens) == len(wanted) and all(len(k) >= limit for k, _ in tokens.values()):
                break   # every modality has its samples: do not read the rest of a large store
            sample = store[i]
            name = sample.key.rsplit("-", 1)[0] if "tokenizers" in meta else meta.get("modality")
            info = tokenizers.get(name)
            if info is None or not info.get("tokenizer_uri"):
                raise UserError(f"sample {sample.key!r}: the store does not name the tokenizer that decodes it",
                                where=uri, fix="evaluate stores written by tokenize or sample stages")
            keys, at = tokens.setdefault(info["modality"], ([], []))
            if len(keys) < limit:
                keys.append(sample.key)
                at.append(i)
                picked[i] = (name, sample.tokens.reshape(-1))
                conditions.setdefault(info["modality"], []).append(
                    None if sample.condition is None else str(sample.condition))
                captions.setdefault(info["modality"], []).append(sample.caption)
                controls.setdefault(info["modality"], []).append(sample.control_tokens)
        decoded = self._decode_units(uri, picked, tokenizers)
        out: dict[str, Decoded] = {}
        for modality, (keys, at) in tokens.items():
            arrays = [decoded[i] for i in at]
            if modality != "pointcloud":   # what the media files show: intensities in [0, 1]
                arrays = [np.clip(a, 0.0, 1.0) for a in arrays]
            out[modality] = Decoded(keys, arrays, conditions[modality], captions[modality], controls[modality], at)
        return out

    def _decode_units(self, uri: str, picked: dict[int, tuple[str, Any]],
                      tokenizers: dict[str, dict[str, Any]], stream: str | None = None) -> dict[int, Any]:
        """The ``picked`` samples of a store decoded, in decode units: the picked ones of each ``samples_per_unit``-wide
        block of the store, one decode call per tokenizer, arrays kept beside the unit's record. ``stream``
        names tokens other than the samples' own (``control``: their control maps), units of their own."""
        import numpy as np

        from arpipe.stages.modalities import load_tokenizer

        loaded: dict[str, Any] = {}

        def decode(indices: list[int]) -> tuple[dict[str, Any], bytes]:
            arrays: list[Any] = [None] * len(indices)
            for name in dict.fromkeys(picked[i][0] for i in indices):   # order kept
                if name not in loaded:
                    loaded[name] = load_tokenizer(tokenizers[name]["tokenizer_uri"], device="cpu")
                at = [k for k, i in enumerate(indices) if picked[i][0] == name]
                for k, array in zip(at, loaded[name].decode_arrays([picked[indices[k]][1] for k in at])):
                    arrays[k] = np.asarray(array)
            buf = io.BytesIO()
            np.savez(buf, *arrays)
            return {}, buf.getvalue()

        blocks: dict[int, list[int]] = {}
        for i in sorted(picked):
            blocks.setdefault(i // self.spec.samples_per_unit, []).append(i)
        out: dict[int, Any] = {}
        for block, indices in blocks.items():
            # the parts pick different samples of one store (first ones, spread): one unit per distinct pick
            name = f"decode-{stream + '-' if stream else ''}{_tag(uri)}-{block:05d}-{_tag(json.dumps(indices))}"
            work = {"store": uri, "indices": indices, **({"stream": stream} if stream else {})}
            _, payload = self._unit(name, work, lambda indices=indices: decode(indices))
            with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:   # the same, done now or reused
                out.update((i, arrays[f"arr_{k}"]) for k, i in enumerate(indices))
        return out


    # ------------------------------------------------------------------ the reduce of a set

    def _words(self) -> dict[str, str] | None:
        return self.spec.classifier.prompt_classes

    def reduce_set(self, role: str, scores: Scores) -> dict[str, Reduced]:
        """The units of a set (``samples`` or ``reference``), one at a time and in order, per modality: per-sample
        rows into ``scores``, features into moments, the pairwise subset kept, verdicts counted."""
        from arpipe.stages.evaluation import Moments

        spec, out = self.spec, {}
        judged = spec.classifier.files()
        for modality, jobs in self._sets.get(role, {}).items():
            total = sum(len(j.indices) for j in jobs)
            subset = set(spread_indices(total, spec.pairwise_samples))
            r = out[modality] = Reduced()
            for job in jobs:
                detail, arrays = self._load(job)
                keys, position = detail["keys"], r.count
                for metric in ("intensity_mean", "intensity_std"):
                    if metric in arrays:
                        scores.add(role, keys, modality, metric, arrays[metric])
                if "intensity_mean" in arrays:
                    r.intensity_sum += math.fsum(arrays["intensity_mean"].tolist())
                kept = [k for k in range(len(keys)) if position + k in subset]
                r.subset_keys += [keys[k] for k in kept]
                if "features" in arrays:
                    part = Moments.of(arrays["features"])
                    r.moments = part if r.moments is None else r.moments.merge(part)
                    r.subset_features += [arrays["features"][k] for k in kept]
                if modality == "pointcloud":
                    r.subset_clouds += [arrays[f"cloud_{k}"] for k in kept]
                if modality in judged:
                    self._verdicts(role, modality, keys, detail, r, scores)
                if role == "samples" and spec.prompt_attributes and modality == "image":
                    r.keys += keys
                    r.captions += detail["captions"]
                    for measure in dict.fromkeys(a.measure for a in spec.prompt_attributes):   # config order
                        r.measures.setdefault(measure, []).extend(arrays[f"measure_{measure}"].tolist())
                r.count += len(keys)
        return out

    def _verdicts(self, role: str, modality: str, keys: list[str], detail: dict[str, Any], r: Reduced,
                  scores: Scores) -> None:
        """The classifier's verdicts on one unit: a ``cas_correct`` row per sample with a class to check (its
        condition, or for prompted samples the one class of ``classifier.prompt_classes`` its prompt names)."""
        from arpipe.stages.evaluation import check_classes

        labels = detail["conditions"]
        words = self._words()
        if role == "samples" and words:
            labels = [c if c is not None else prompt_class(t, words)
                      for c, t in zip(labels, detail["captions"], strict=True)]
        at = [k for k, c in enumerate(labels) if c is not None]
        r.unlabelled += len(labels) - len(at)
        requested, predicted = [labels[k] for k in at], [detail["predicted"][k] for k in at]
        r.classes = detail["classes"]
        try:
            with _as_user_error(self._classifier_path(modality)):
                check_classes(requested, r.classes, "reference" if role == "reference" else "samples")
        except UserError as err:
            if role == "samples":
                raise
            r.refused = r.refused or err   # raised only if the samples have classes to score (classification)
            return
        r.verdicts.update(zip(requested, predicted, strict=True))
        scores.add(role, [keys[k] for k in at], modality, "cas_correct",
                   [float(p == q) for p, q in zip(requested, predicted, strict=True)])

    def _classifier_path(self, modality: str) -> str:
        from arpipe.pipeline.storage import normalize

        return normalize(self.spec.classifier.files()[modality], self.ctx.pipeline_dir)

    # ------------------------------------------------------------------ samples

    def samples(self, scores: Scores, generated: dict[str, Reduced], reference: dict[str, Reduced]) -> None:
        for modality, gen in generated.items():
            ref = reference.get(modality)
            if ref is None:
                scores.skipped[f"{modality}/*"] = f"the reference store has no {modality} samples"
                continue
            if modality != "pointcloud":
                gap = gen.intensity_sum / gen.count - ref.intensity_sum / ref.count
                scores.summary[f"{modality}/intensity_mean_gap"] = float(abs(gap))
            if modality in ("image", "video"):
                self._feature_metrics(scores, modality, gen, ref)
            elif modality == "pointcloud":
                self._cloud_metrics(scores, gen, ref)
            else:
                scores.skipped[f"{modality}/fid"] = ("no feature network for 3-D volumes; intensity statistics "
                                                     "and reconstruction PSNR/SSIM are computed")

    def _feature_metrics(self, scores: Scores, modality: str, gen: Reduced, ref: Reduced) -> None:
        import numpy as np

        from arpipe.stages.evaluation import frechet_distance, kernel_inception_distance, precision_recall

        kind = modality
        names = ["fid", "kid", "precision", "recall"] if kind == "image" else ["fvd"]
        if gen.moments is None or ref.moments is None:
            field_ = "features.image" if kind == "image" else "features.video"
            net = "an Inception-v3" if kind == "image" else "an I3D"
            for name in names:
                scores.skipped[f"{modality}/{name}"] = (f"no {field_}: export {net} network with torch.jit.save "
                                                        f"and set {field_} to its path")
            return
        distance = float(frechet_distance(*ref.moments.gaussian(), *gen.moments.gaussian()))
        if kind == "video":
            scores.summary[f"{modality}/fvd"] = distance
            return
        scores.summary[f"{modality}/fid"] = distance
        fake, real = np.stack(gen.subset_features), np.stack(ref.subset_features)
        subset = min(len(fake), len(real), 1000)
        kid_mean, kid_std = kernel_inception_distance(real, fake, subsets=10, subset_size=subset, seed=self.spec.seed)
        scores.summary[f"{modality}/kid"], scores.summary[f"{modality}/kid_std"] = float(kid_mean), float(kid_std)
        k = min(self.spec.knn, len(real) - 1, len(fake) - 1)
        precision, recall = precision_recall(real, fake, k=k)
        scores.summary[f"{modality}/precision"], scores.summary[f"{modality}/recall"] = float(precision), float(recall)

    def _cloud_metrics(self, scores: Scores, gen: Reduced, ref: Reduced) -> None:
        import numpy as np

        from arpipe.stages.evaluation import coverage, mmd, one_nn_accuracy, pairwise_distances

        clouds, ref_clouds = gen.subset_clouds, ref.subset_clouds
        rng = np.random.default_rng(self.spec.seed)
        n = min(CLOUD_POINTS, *(len(c) for c in clouds + ref_clouds))

        def sub(c, n: int):
            c = np.asarray(c, dtype=np.float64)
            return c[np.sort(rng.choice(len(c), n, replace=False))] if len(c) > n else c

        a, b = [sub(c, n) for c in clouds], [sub(c, n) for c in ref_clouds]
        m = min(n, EMD_POINTS)
        a_emd, b_emd = [sub(c, m) for c in a[:EMD_CLOUDS]], [sub(c, m) for c in b[:EMD_CLOUDS]]
        for metric, x, y in (("cd", a, b), ("emd", a_emd, b_emd)):
            scores.summary[f"pointcloud/mmd_{metric}"] = float(mmd(x, y, metric))
            scores.summary[f"pointcloud/cov_{metric}"] = float(coverage(x, y, metric))
            scores.summary[f"pointcloud/1nna_{metric}"] = float(one_nn_accuracy(x, y, metric))
        nearest = pairwise_distances(a, b, "cd").min(axis=1)
        scores.add("samples", gen.subset_keys, "pointcloud", "nearest_reference_cd", nearest)

    # ------------------------------------------------------------------ classification (CAS)

    def classification(self, scores: Scores, generated: dict[str, Reduced], reference: dict[str, Reduced]) -> None:
        """Classification Accuracy Score per modality that has a classifier: the share of class-conditional
        samples it assigns to the class they were drawn for, overall and per class; the same on the
        reference (how well the judge itself does on real data); confusion matrices as a PNG."""
        import numpy as np

        from arpipe.stages.evaluation import confusion_matrix

        spec, ctx = self.spec, self.ctx
        for modality, uri in spec.classifier.files().items():
            gen = generated.get(modality)
            if gen is None:
                scores.skipped[f"{modality}/cas"] = f"the samples have no {modality} samples"
                continue
            if gen.unlabelled:
                why = " or prompted with no one class of classifier.prompt_classes" if self._words() else ""
                print(f"[{ctx.name}] CAS skips {gen.unlabelled} unconditional{why} {modality} samples (no class to "
                      "check)", flush=True)
            if not gen.verdicts:
                scores.skipped[f"{modality}/cas"] = ("the samples are unconditional: sample with classes (or "
                                                     "prompts and classifier.prompt_classes) to score CAS")
                continue
            panels: dict[str, Counter] = {"samples": gen.verdicts}
            ref = reference.get(modality)
            if ref is not None and ref.refused is not None:
                raise ref.refused
            if ref is None or not ref.verdicts:
                scores.skipped[f"{modality}/cas_reference"] = "the reference samples have no class labels"
            else:
                panels["reference (real data)"] = ref.verdicts
                scores.summary[f"{modality}/cas_reference"] = _accuracy(ref.verdicts)
            scores.summary[f"{modality}/cas"] = _accuracy(gen.verdicts)
            requested = {r for r, _p in gen.verdicts}
            for label in sorted(requested, key=lambda c: (len(c), c)):
                scores.summary[f"{modality}/cas/{_metric_part(label)}"] = _accuracy(
                    Counter({(r, p): n for (r, p), n in gen.verdicts.items() if r == label}))
            shown = {c for verdicts in panels.values() for pair in verdicts for c in pair}
            classes = [c for c in gen.classes if c in shown] or sorted(shown, key=lambda c: (len(c), c))
            at = {c: i for i, c in enumerate(classes)}
            matrices = {}
            for name, verdicts in panels.items():
                counts_RP = np.zeros((len(classes), len(classes)), dtype=np.int64)
                for (r, p), n in verdicts.items():
                    counts_RP[at[r], at[p]] += n
                matrices[name] = counts_RP
            folder = ctx.work_dir / "metrics"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"cas_{modality}.png"
            confusion_matrix(matrices, classes, path, title=f"{ctx.name}: {modality} classifier, requested x "
                                                             "predicted class")
            scores.plots.append(path)
            judged = f"; on the reference {scores.summary[f'{modality}/cas_reference']:.3f}" \
                if f"{modality}/cas_reference" in scores.summary else ""
            print(f"[{ctx.name}] {modality} CAS {scores.summary[f'{modality}/cas']:.3f} over "
                  f"{sum(gen.verdicts.values())} samples{judged} ({uri})", flush=True)

    # ------------------------------------------------------------------ prompt following

    def attributes(self, scores: Scores, generated: dict[str, Reduced]) -> None:
        """Attributes the prompts ask for (``prompt_attributes``): over matched pairs of prompted images ("a
        thick seven" and "a thin seven", k-th sample with k-th), the share where the ``word`` sample measures
        higher than its ``opposite`` sample, the number of pairs and the mean difference of the measure."""
        import numpy as np

        from arpipe.stages.evaluation import matched_pairs

        spec, ctx = self.spec, self.ctx
        image = generated.get("image")
        named = [(a, f"image/attribute/{_metric_part(a.word)}_vs_{_metric_part(a.opposite)}")
                 for a in spec.prompt_attributes]
        if image is None or not any(image.captions):
            why = ("the samples have no image samples" if image is None else
                   "the samples have no prompts: sample with prompts: to score prompt_attributes")
            scores.skipped.update((name, why) for _a, name in named)
            return
        measured = {m: np.asarray(v, dtype=np.float64) for m, v in image.measures.items()}
        for attribute, name in named:
            word, opposite, measure = attribute.word, attribute.opposite, attribute.measure
            pairs = matched_pairs(image.captions, word, opposite)
            if not pairs:
                scores.skipped[name] = (f"no prompt with {word!r} has a counterpart with {opposite!r} in its place "
                                        f"among the {len(image.keys)} samples: prompt both, e.g. \"a {word} "
                                        f"seven\" and \"a {opposite} seven\"")
                continue
            higher, lower = (measured[measure][[p[side] for p in pairs]] for side in (0, 1))
            wins = (higher > lower).astype(np.float64)
            scores.add("samples", [image.keys[a] for a, _b in pairs], "image", f"{word}_vs_{opposite}", wins)
            scores.summary[name] = float(wins.mean())
            scores.summary[f"{name}/pairs"] = float(len(pairs))
            scores.summary[f"{name}/mean_difference"] = float((higher - lower).mean())
            print(f"[{ctx.name}] image {word} vs {opposite}: the {word!r} sample has more {measure} in "
                  f"{wins.mean():.3f} of {len(pairs)} matched pairs (noise: about 0.5)", flush=True)
        for measure, values in measured.items():
            scores.add("samples", image.keys, "image", measure, values)

    def control_following(self, scores: Scores) -> None:
        """How well each sample's edges follow its control map (``control_agreement``): the correlation of its
        edge map (the control maps' transform) with its control map beyond the controls' mean map, and the same
        against another sample's control map as the baseline."""
        import numpy as np

        from arpipe.stages.evaluation import edge_agreement, other_controls
        from arpipe.stages.modalities.controls import TRANSFORMS, control_image
        from arpipe.stages.store import TokenStore

        spec, ctx = self.spec, self.ctx
        names = ("image/control_agreement", "image/control_agreement_shuffled")
        decoded = self._decoded(spec.samples, spec.max_samples).get("image")
        at = [k for k, c in enumerate(decoded.controls or ()) if c] if decoded else []
        meta = (TokenStore.open(spec.samples).manifest.metadata or {}).get("control") or {}
        other = other_controls([decoded.controls[k] for k in at]) if at else None
        why = None
        if not at:
            why = "the samples have no control maps: sample with controls: to score control_agreement"
        elif not meta.get("uri"):
            why = ("the samples store does not name its control maps' tokenizer (it was sampled before arpipe "
                   "recorded it): rerun its sample stage with `arpipe run --force <stage>`")
        elif other is None:
            why = (f"all {len(at)} controlled samples share one control map; the agreement is measured beyond the "
                   "controls' mean map: sample under at least two")
        if why:
            scores.skipped.update((name, why) for name in names)
            return
        picked = {decoded.indices[k]: ("control", np.asarray(decoded.controls[k])) for k in at}
        maps = self._decode_units(spec.samples, picked, {"control": {"tokenizer_uri": meta["uri"]}}, stream="control")
        controls = [np.clip(maps[decoded.indices[k]], 0.0, 1.0) for k in at]
        # maps from another source than a transform of the image (depth, segmentation): the image's Canny edges
        transform = meta.get("transform") if meta.get("transform") in TRANSFORMS else "canny"
        edges = [control_image(np.asarray(decoded.arrays[k], dtype=np.float32), transform, meta.get("sigma", 1.0))
                 for k in at]
        if edges[0].shape[-2:] != controls[0].shape[-2:]:
            size = "x".join(map(str, controls[0].shape[-2:])), "x".join(map(str, edges[0].shape[-2:]))
            scores.skipped.update((name, f"the control maps are {size[0]} pixels, the samples {size[1]}: use a "
                                         "control tokenizer fitted at the samples' size") for name in names)
            return
        own = edge_agreement(edges, controls)
        shuffled = edge_agreement(edges, [controls[j] for j in other], mean_of=controls)
        keys = [decoded.keys[k] for k in at]
        scores.add("samples", keys, "image", "control_agreement", own)
        scores.add("samples", keys, "image", "control_agreement_shuffled", shuffled)
        scores.summary[names[0]], scores.summary[names[1]] = float(own.mean()), float(shuffled.mean())
        if shuffled.mean() > 0:   # a correlation: a baseline at or below 0 makes no ratio
            scores.summary["image/control_agreement_ratio"] = float(own.mean() / shuffled.mean())
        print(f"[{ctx.name}] image control agreement {own.mean():.3f} with the own control map, "
              f"{shuffled.mean():.3f} with another sample's, over {len(at)} samples ({transform} edges)", flush=True)


    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Output]:
        import numpy as np

        from arpipe.stages.evaluation import score_distributions

        spec, ctx = self.spec, self.ctx
        folder = ctx.work_dir / "metrics"
        folder.mkdir(parents=True, exist_ok=True)
        scores = Scores(folder / "scores.parquet")
        ctx.run_log.link_model(self._model_id())   # the metrics show on the logged model's MLflow page too
        self.map_units(self._plan())
        sets: dict[str, dict[str, Reduced]] = {}

        def reduced(role: str) -> dict[str, Reduced]:
            if role not in sets:
                sets[role] = self.reduce_set(role, scores)
            return sets[role]

        parts = [(name, part) for name, part, wanted in [
            ("held-out likelihood", self.likelihood, spec.model),
            ("reconstruction", self.reconstruction, spec.reconstruction),
            ("sample metrics", lambda s: self.samples(s, reduced("samples"), reduced("reference")),
             spec.samples and spec.reference),
            ("classification", lambda s: self.classification(s, reduced("samples"), reduced("reference")),
             spec.classifier.files()),
            ("prompt attributes", lambda s: self.attributes(s, reduced("samples")), spec.prompt_attributes),
            ("control agreement", self.control_following, spec.control_agreement)] if wanted]
        progress = Progress(ctx.name, len(parts), what="parts")
        try:
            for done, (name, part) in enumerate(parts, 1):
                part(scores)
                progress.update(done, finished=name)
        finally:
            scores.close()
        score_distributions({k: np.asarray(v) for k, v in scores.values.items()}, folder / "scores.png",
                            title=f"{ctx.name}: per-sample scores")
        summary = {k: _finite(v) for k, v in sorted(scores.summary.items())}
        (folder / "metrics.json").write_text(json.dumps({"metrics": summary, "skipped": scores.skipped},
                                                        indent=1, sort_keys=True))
        ctx.log_metrics({k: v for k, v in summary.items() if v is not None})
        if ctx.run_log.enabled:
            if scores.skipped:
                ctx.run_log.set_tag("arpipe.skipped_metrics",
                               "; ".join(f"{k}: {v}" for k, v in sorted(scores.skipped.items()))[:5000])
            ctx.log_artifact(folder / "scores.png", "metrics")
            for path in scores.plots:
                ctx.log_artifact(path, "metrics")
            ctx.log_artifact(folder / "metrics.json", "metrics")
        by_reason: dict[str, list[str]] = {}
        for name, reason in sorted(scores.skipped.items()):
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            print(f"[{ctx.name}] skipped {', '.join(names)}: {reason}", flush=True)
        counts = self._unit_counts
        print(f"[{ctx.name}] {counts['done'] + counts['reused']} units ({counts['reused']} reused)", flush=True)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if v is not None)
        print(f"[{ctx.name}] {shown}", flush=True)
        return {"metrics": Output(path="metrics")}


def _accuracy(verdicts: Counter) -> float:
    """The share of ``(requested, predicted)`` verdicts that agree."""
    return sum(n for (r, p), n in verdicts.items() if r == p) / sum(verdicts.values())

@contextlib.contextmanager
def _as_user_error(where: str):
    """A classifier's problem as one line naming its file."""
    from arpipe.stages.evaluation import ClassifierError

    try:
        yield
    except ClassifierError as err:
        raise UserError(err.what, where=where, fix=err.fix) from None


def load_judge(path: str):
    """The judge in a classifier file (local or s3://); a missing or unreadable one is one line naming it."""
    from arpipe.pipeline.storage import storage_for
    from arpipe.stages.evaluation import Classifier

    try:
        data = storage_for(path).read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError("classifier file not found", where=path,
                        fix="give a .skops or .pt file, e.g. the output of a python stage that fits "
                            "one (examples/digits_steps.py)") from None
    with _as_user_error(path):
        return Classifier.load_bytes(data, path)


def _tag(text: str) -> str:
    """A short, stable name part for a store uri or a list of indices."""
    return digest_bytes(text.encode()).split(":", 1)[1][:10]


def _metric_part(label: str) -> str:
    """A class label as one segment of an MLflow metric name (letters, digits, ``_-. ``)."""
    return re.sub(r"[^\w.\- ]", "_", label) or "_"


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """``metrics.json`` of an evaluate output folder."""
    return json.loads((Path(folder) / "metrics.json").read_text())
