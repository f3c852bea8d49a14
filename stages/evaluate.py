"""Stage kind ``evaluate``: score a model and its samples; output ``metrics``.

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

The work that grows with the samples is done in resumable units of
``UNIT_SAMPLES`` samples (``stages.store.units``): *decode* units (a chunk of
one store's selected samples, or of their control maps, through its tokenizer;
the arrays are kept as ``.arpipe/units/<unit>.npz``) and *NLL* units (a chunk
of a held-out store under the model; the per-sample values are kept in the
unit's record). Each is committed by its ``.arpipe/units/<unit>.json`` record,
written last, and a rerun reuses every committed one, so a crash costs at most
the unit in flight; the metrics computed from the units are the same whether
they were reused or not.

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
import re
import time
from collections.abc import Callable, Iterable
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
UNIT_SAMPLES = 16   # samples per resumable unit (decode or NLL chunk): what a crash can cost at most


class Scores:
    """Per-sample rows and summary values, accumulated by the parts."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, float]] = []
        self.summary: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.plots: list[Path] = []   # PNGs beside metrics.json, also logged to MLflow

    def add(self, set_: str, keys: list[str], modality: str, metric: str, values) -> None:
        self.rows += [(set_, k, modality, metric, float(v)) for k, v in zip(keys, values, strict=True)]

    def table(self):
        import pyarrow as pa

        cols = list(zip(*self.rows)) if self.rows else [[], [], [], [], []]
        return pa.table({"set": pa.array(cols[0], pa.string()), "key": pa.array(cols[1], pa.string()),
                         "modality": pa.array(cols[2], pa.string()), "metric": pa.array(cols[3], pa.string()),
                         "value": pa.array(cols[4], pa.float64())})


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


class EvaluateStage(Stage):
    kind = "evaluate"
    version = "1"
    spec: EvaluateSpec

    def __init__(self, spec: EvaluateSpec, ctx: StageContext) -> None:
        super().__init__(spec, ctx)
        self._decoded_stores: dict[tuple[str, int, bool], dict[str, Decoded]] = {}
        self._unit_counts = {"done": 0, "reused": 0}

    # ------------------------------------------------------------------ resumable units

    def _unit(self, name: str, work: dict[str, Any],
              make: Callable[[], tuple[dict[str, Any], bytes | None]]) -> tuple[dict[str, Any], bytes | None]:
        """Reuse the committed unit ``name`` when it did this ``work`` (a store and its sample indices), else do
        it: ``make()`` returns what to keep in the record (JSON values) and an optional side file (bytes)."""
        from arpipe.pipeline.storage import join, storage_for
        from arpipe.stages.store import StoreUnits, UnitRecord

        ctx = self.ctx
        units = StoreUnits(out_uri=ctx.out_uri, store="", fingerprint=ctx.fingerprint)
        storage = storage_for(ctx.out_uri)
        side = units.side_file(name, ".npz")
        record = units.reusable(name)
        if record is not None and record.detail.get("work") == work:
            self._unit_counts["reused"] += 1
            kept = {k: v for k, v in record.detail.items() if k != "work"}
            return kept, storage.read_bytes(join(ctx.out_uri, side)) if side in record.files else None
        started = time.time()
        kept, payload = make()
        files = {}
        if payload is not None:
            storage.write_bytes(join(ctx.out_uri, side), payload)
            files[side] = (len(payload), digest_bytes(payload))
        units.write(UnitRecord(name=name, fingerprint=ctx.fingerprint, shards=(), samples=len(work["indices"]),
                               tokens=0, files=files, seconds=time.time() - started,
                               detail={"work": work, **kept}))
        self._unit_counts["done"] += 1
        return kept, payload

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
        import torch

        from arpipe.pipeline.models import resolve_model
        from arpipe.stages.models.folder import open_model

        spec = self.spec
        opened = open_model(resolve_model(spec.model, self.ctx.tracking_uri,
                                          where=f"stages.{self.ctx.name}.model").location)
        nll_all, count_all = 0.0, 0
        with torch.no_grad():
            for uri in spec.heldout or spec.reference:
                name, keys, nll, counts = self._store_nll(opened, uri)
                modality = opened.tokenizers[name]["modality"]
                scores.add("heldout", keys, modality, "nll", nll)
                scores.add("heldout", keys, modality, "bits_per_token", nll / counts / math.log(2))
                per_token = float(nll.sum() / counts.sum())
                scores.summary[f"heldout/{name}/bits_per_token"] = per_token / math.log(2)
                nll_all, count_all = nll_all + float(nll.sum()), count_all + int(counts.sum())
                print(f"[{self.ctx.name}] held-out {name}: {per_token:.4f} nats/token = "
                      f"{per_token / math.log(2):.4f} bits/token over {len(keys)} samples of {uri}", flush=True)
        per_token = nll_all / count_all
        scores.summary.update({"heldout/nll_per_token": per_token, "heldout/bits_per_token": per_token / math.log(2),
                               "heldout/tokens": float(count_all)})

    def _store_nll(self, opened, uri: str):
        """Per-sample summed NLL (nats) of the first ``max_samples`` samples of a store, and their token counts,
        in NLL units of ``UNIT_SAMPLES`` samples."""
        import numpy as np

        from arpipe.stages.models.folder import vocab_name_of_store
        from arpipe.stages.store import TokenStore

        store = TokenStore.open(uri)
        name = vocab_name_of_store(opened.tokenizers, store, uri)
        n = min(len(store), self.spec.max_samples)
        keys, nll, counts = [], [], []
        plans: dict[int, Any] = {}
        for lo in range(0, n, UNIT_SAMPLES):
            indices = list(range(lo, min(n, lo + UNIT_SAMPLES)))
            kept, _ = self._unit(f"nll-{_tag(uri)}-{lo:06d}", {"store": uri, "indices": indices},
                                 lambda indices=indices: (self._chunk_nll(opened, store, name, indices, plans), None))
            keys += kept["keys"]
            nll += kept["nll"]
            counts += kept["counts"]
        return name, keys, np.asarray(nll, dtype=np.float64), np.asarray(counts)

    def _chunk_nll(self, opened, store, name: str, indices: list[int], plans: dict[int, Any]) -> dict[str, list]:
        """One NLL unit: the samples ``indices`` of ``store`` in batches of ``batch_size``."""
        import numpy as np
        import torch

        from arpipe.stages.models import batch_inputs, sequential_nll
        from arpipe.stages.models.folder import plan_for_modality

        config, vocab, model = opened.config, opened.vocab, opened.model
        info = opened.tokenizers[name]
        keys, nll, counts = [], [], []
        for lo in range(0, len(indices), self.spec.batch_size):
            samples = [store[i] for i in indices[lo:lo + self.spec.batch_size]]
            for length in sorted({int(s.tokens.size) for s in samples}):
                group = [s for s in samples if int(s.tokens.size) == length]
                if length not in plans:
                    plans[length] = plan_for_modality(config, dict(info.get("layout") or {}), length,
                                                      opened.scale_inputs.get(name))
                targets = torch.stack([vocab.to_global(name, torch.from_numpy(
                    s.tokens.reshape(-1).astype(np.int64))) for s in group])
                context = torch.tensor([vocab.context_of(name, s) for s in group], dtype=torch.long)
                if config.paradigm == "masked":   # decoded one token a step in raster order (maskgit.py)
                    nll += sequential_nll(model, plans[length], targets, context).tolist()
                else:
                    inputs = batch_inputs(plans[length], targets, context)
                    logits, _ = model(inputs.input_ids, inputs.coords, inputs.group_ids,
                                      features_BLD=inputs.features, feature_mask_BL=inputs.feature_mask)
                    ce = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), inputs.target_ids,
                                                           ignore_index=-100, reduction="none")
                    nll += ce.sum(1).tolist()
                counts += [length] * len(group)
                keys += [s.key for s in group]
        return {"keys": keys, "nll": nll, "counts": counts}

    # ------------------------------------------------------------------ reconstruction

    def reconstruction(self, scores: Scores) -> None:
        import itertools

        import numpy as np

        from arpipe.pipeline.storage import normalize
        from arpipe.stages.modalities import load_tokenizer, open_reader
        from arpipe.stages.modalities.metrics import round_trip

        rec = self.spec.reconstruction
        tok = load_tokenizer(rec.tokenizer)
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

    def _decoded(self, uri: str, limit: int, *, spread: bool = False) -> dict[str, Decoded]:
        """The first ``limit`` samples of each modality of a store, decoded; ``spread``: spaced evenly over
        the store instead (stores written from class folders hold one class after another)."""
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
        spread = spread and len(store) > limit
        if (uri, limit, spread) in self._decoded_stores:   # the parts read the same sets: decode them once
            return self._decoded_stores[uri, limit, spread]
        order: Iterable[int] = range(len(store))
        if spread:   # `limit` indices evenly over the store first, then the rest (other modalities' room)
            first = sorted({k * len(store) // limit for k in range(limit)})
            taken = set(first)
            order = itertools.chain(first, (i for i in range(len(store)) if i not in taken))
        for i in order:
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
        self._decoded_stores[uri, limit, spread] = out
        return out

    def _decode_units(self, uri: str, picked: dict[int, tuple[str, Any]],
                      tokenizers: dict[str, dict[str, Any]], stream: str | None = None) -> dict[int, Any]:
        """The ``picked`` samples of a store decoded, in decode units: the picked ones of each ``UNIT_SAMPLES``-wide
        block of the store, one decode call per tokenizer, arrays kept beside the unit's record. ``stream``
        names tokens other than the samples' own (``control``: their control maps), units of their own."""
        import numpy as np

        from arpipe.stages.modalities import load_tokenizer

        loaded: dict[str, Any] = {}

        def decode(indices: list[int]) -> tuple[dict[str, Any], bytes]:
            arrays: list[Any] = [None] * len(indices)
            for name in dict.fromkeys(picked[i][0] for i in indices):   # order kept
                if name not in loaded:
                    loaded[name] = load_tokenizer(tokenizers[name]["tokenizer_uri"])
                at = [k for k, i in enumerate(indices) if picked[i][0] == name]
                for k, array in zip(at, loaded[name].decode_arrays([picked[indices[k]][1] for k in at])):
                    arrays[k] = np.asarray(array)
            buf = io.BytesIO()
            np.savez(buf, *arrays)
            return {}, buf.getvalue()

        blocks: dict[int, list[int]] = {}
        for i in sorted(picked):
            blocks.setdefault(i // UNIT_SAMPLES, []).append(i)
        out: dict[int, Any] = {}
        for block, indices in blocks.items():
            # the parts pick different samples of one store (first ones, spread): one unit per distinct pick
            name = f"decode-{stream + '-' if stream else ''}{_tag(uri)}-{block:05d}-{_tag(json.dumps(indices))}"
            work = {"store": uri, "indices": indices, **({"stream": stream} if stream else {})}
            _, payload = self._unit(name, work, lambda indices=indices: decode(indices))
            with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:   # the same, done now or reused
                out.update((i, arrays[f"arr_{k}"]) for k, i in enumerate(indices))
        return out

    def samples(self, scores: Scores) -> None:
        import numpy as np

        spec = self.spec
        generated = self._decoded(spec.samples, spec.max_samples)
        reference: dict[str, tuple[list[str], list[Any]]] = {}
        for uri in spec.reference:
            for modality, (keys, arrays, *_) in self._decoded(uri, spec.max_samples).items():
                have = reference.setdefault(modality, ([], []))
                room = spec.max_samples - len(have[0])
                have[0].extend(keys[:room])
                have[1].extend(arrays[:room])
        for modality, (keys, arrays, *_) in generated.items():
            if modality not in reference:
                scores.skipped[f"{modality}/*"] = f"the reference store has no {modality} samples"
                continue
            ref_keys, ref_arrays = reference[modality]
            if modality != "pointcloud":
                for set_, k, arrs in (("samples", keys, arrays), ("reference", ref_keys, ref_arrays)):
                    scores.add(set_, k, modality, "intensity_mean", [float(np.mean(a)) for a in arrs])
                    scores.add(set_, k, modality, "intensity_std", [float(np.std(a)) for a in arrs])
                means = [np.mean([np.mean(a) for a in arrs]) for arrs in (arrays, ref_arrays)]
                scores.summary[f"{modality}/intensity_mean_gap"] = float(abs(means[0] - means[1]))
            if modality == "image":
                self._feature_metrics(scores, modality, arrays, ref_arrays, kind="image")
            elif modality == "video":
                self._feature_metrics(scores, modality, arrays, ref_arrays, kind="video")
            elif modality == "pointcloud":
                self._cloud_metrics(scores, keys, arrays, ref_arrays)
            else:
                scores.skipped[f"{modality}/fid"] = ("no feature network for 3-D volumes; intensity statistics "
                                                     "and reconstruction PSNR/SSIM are computed")

    def _feature_metrics(self, scores: Scores, modality: str, arrays: list, ref_arrays: list, *, kind: str) -> None:
        import numpy as np

        from arpipe.stages.evaluation import (
            FeatureExtractor,
            frechet_from_features,
            kernel_inception_distance,
            precision_recall,
        )

        f = self.spec.features
        weights, size = (f.image, f.image_size) if kind == "image" else (f.video, f.video_size)
        names = ["fid", "kid", "precision", "recall"] if kind == "image" else ["fvd"]
        if weights is None:
            field = "features.image" if kind == "image" else "features.video"
            net = "an Inception-v3" if kind == "image" else "an I3D"
            for name in names:
                scores.skipped[f"{modality}/{name}"] = (f"no {field}: export {net} network with torch.jit.save "
                                                        f"and set {field} to its path")
            return
        from arpipe.pipeline.storage import normalize

        extractor = FeatureExtractor.load(normalize(weights, self.ctx.pipeline_dir), kind=kind, input_size=size)
        fake = extractor.features(np.stack(arrays).astype(np.float32))
        real = extractor.features(np.stack(ref_arrays).astype(np.float32))
        if kind == "video":
            scores.summary[f"{modality}/fvd"] = float(frechet_from_features(real, fake))
            return
        scores.summary[f"{modality}/fid"] = float(frechet_from_features(real, fake))
        subset = min(len(fake), len(real), 1000)
        kid_mean, kid_std = kernel_inception_distance(real, fake, subsets=10, subset_size=subset, seed=self.spec.seed)
        scores.summary[f"{modality}/kid"], scores.summary[f"{modality}/kid_std"] = float(kid_mean), float(kid_std)
        k = min(self.spec.knn, len(real) - 1, len(fake) - 1)
        precision, recall = precision_recall(real, fake, k=k)
        scores.summary[f"{modality}/precision"], scores.summary[f"{modality}/recall"] = float(precision), float(recall)

    def _cloud_metrics(self, scores: Scores, keys: list[str], clouds: list, ref_clouds: list) -> None:
        import numpy as np

        from arpipe.stages.evaluation import coverage, mmd, one_nn_accuracy, pairwise_distances

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
        scores.add("samples", keys, "pointcloud", "nearest_reference_cd", nearest)

    # ------------------------------------------------------------------ classification (CAS)

    def classification(self, scores: Scores) -> None:
        """Classification Accuracy Score per modality that has a classifier: the share of class-conditional
        samples it assigns to the class they were drawn for, overall and per class; the same on the
        reference (how well the judge itself does on real data); confusion matrices as a PNG."""
        import numpy as np

        from arpipe.stages.evaluation import confusion_counts, confusion_matrix

        spec, ctx = self.spec, self.ctx
        # spread over the store: a sample stage with `classes: {a: n, b: m}` writes one class after another
        generated = self._decoded(spec.samples, spec.max_samples, spread=True)
        for modality, uri in spec.classifier.files().items():
            if modality not in generated:
                scores.skipped[f"{modality}/cas"] = f"the samples have no {modality} samples"
                continue
            judge, where = self._classifier(uri)
            size = spec.classifier.image_size if modality == "image" else None
            panels: dict[str, tuple[list[str], list[str]]] = {}
            sets = [("samples", generated[modality])]
            reference = self._labelled_reference(modality)
            if reference is None:
                scores.skipped[f"{modality}/cas_reference"] = "the reference samples have no class labels"
            else:
                sets.append(("reference", reference))
            for set_, decoded in sets:
                labels = decoded.conditions
                words = spec.classifier.prompt_classes
                if set_ == "samples" and words and decoded.captions:   # prompted samples: the class they name
                    labels = [c if c is not None else prompt_class(t, words)
                              for c, t in zip(decoded.conditions, decoded.captions, strict=True)]
                at = [i for i, c in enumerate(labels) if c is not None]
                if set_ == "samples" and len(at) < len(decoded.keys):
                    why = " or prompted with no one class of classifier.prompt_classes" if words else ""
                    print(f"[{ctx.name}] CAS skips {len(decoded.keys) - len(at)} unconditional{why} {modality} "
                          "samples (no class to check)", flush=True)
                if not at:
                    scores.skipped[f"{modality}/cas"] = ("the samples are unconditional: sample with classes (or "
                                                         "prompts and classifier.prompt_classes) to score CAS")
                    break
                requested = [labels[i] for i in at]
                with _as_user_error(where):
                    judge.check_classes(requested, "reference" if set_ == "reference" else "samples")
                    predicted = judge.predict(modality, [decoded.arrays[i] for i in at], image_size=size)
                correct = np.asarray([p == r for p, r in zip(predicted, requested)], dtype=np.float64)
                scores.add(set_, [decoded.keys[i] for i in at], modality, "cas_correct", correct)
                if set_ == "reference":
                    scores.summary[f"{modality}/cas_reference"] = float(correct.mean())
                    panels["reference (real data)"] = (requested, predicted)
                    continue
                scores.summary[f"{modality}/cas"] = float(correct.mean())
                for label in sorted(set(requested), key=lambda c: (len(c), c)):
                    hits = correct[[r == label for r in requested]]
                    scores.summary[f"{modality}/cas/{_metric_part(label)}"] = float(hits.mean())
                panels["samples"] = (requested, predicted)
            if "samples" not in panels:
                continue
            shown = {c for requested, predicted in panels.values() for c in requested + predicted}
            classes = [c for c in judge.classes if c in shown] or sorted(shown, key=lambda c: (len(c), c))
            folder = ctx.work_dir / "metrics"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"cas_{modality}.png"
            confusion_matrix({name: confusion_counts(r, p, classes) for name, (r, p) in panels.items()}, classes,
                             path, title=f"{ctx.name}: {modality} classifier, requested x predicted class")
            scores.plots.append(path)
            judged = f"; on the reference {scores.summary[f'{modality}/cas_reference']:.3f}" \
                if f"{modality}/cas_reference" in scores.summary else ""
            print(f"[{ctx.name}] {modality} CAS {scores.summary[f'{modality}/cas']:.3f} over "
                  f"{len(panels['samples'][0])} samples{judged} ({uri})", flush=True)

    def _classifier(self, uri: str):
        """The judge in a classifier file (local or s3://), and the path errors name."""
        from arpipe.pipeline.storage import normalize, storage_for
        from arpipe.stages.evaluation import Classifier

        path = normalize(uri, self.ctx.pipeline_dir)
        try:
            data = storage_for(path).read_bytes(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise UserError("classifier file not found", where=path,
                            fix="give a .skops or .pt file, e.g. the output of a python stage that fits "
                                "one (examples/digits_steps.py)") from None
        with _as_user_error(path):
            return Classifier.load_bytes(data, path), path

    def _labelled_reference(self, modality: str) -> Decoded | None:
        """Reference samples of ``modality`` spread over the stores (so every class shows), if they have labels."""
        keys, arrays, conditions = [], [], []
        for uri in self.spec.reference:
            decoded = self._decoded(uri, self.spec.max_samples, spread=True).get(modality)
            if decoded is None:
                continue
            room = self.spec.max_samples - len(keys)
            keys += decoded.keys[:room]
            arrays += decoded.arrays[:room]
            conditions += decoded.conditions[:room]
        if not any(c is not None for c in conditions):
            return None
        return Decoded(keys, arrays, conditions)

    # ------------------------------------------------------------------ prompt following

    def attributes(self, scores: Scores) -> None:
        """Attributes the prompts ask for (``prompt_attributes``): over matched pairs of prompted images ("a
        thick seven" and "a thin seven", k-th sample with k-th), the share where the ``word`` sample measures
        higher than its ``opposite`` sample, the number of pairs and the mean difference of the measure."""
        import numpy as np

        from arpipe.stages.evaluation import MEASURES, matched_pairs

        spec, ctx = self.spec, self.ctx
        decoded = self._decoded(spec.samples, spec.max_samples).get("image")
        named = [(a, f"image/attribute/{_metric_part(a.word)}_vs_{_metric_part(a.opposite)}")
                 for a in spec.prompt_attributes]
        if decoded is None or not any(decoded.captions or ()):
            why = ("the samples have no image samples" if decoded is None else
                   "the samples have no prompts: sample with prompts: to score prompt_attributes")
            scores.skipped.update((name, why) for _a, name in named)
            return
        measured: dict[str, np.ndarray] = {}
        for attribute, name in named:
            word, opposite, measure = attribute.word, attribute.opposite, attribute.measure
            pairs = matched_pairs(decoded.captions, word, opposite)
            if not pairs:
                scores.skipped[name] = (f"no prompt with {word!r} has a counterpart with {opposite!r} in its place "
                                        f"among the {len(decoded.keys)} samples: prompt both, e.g. \"a {word} "
                                        f"seven\" and \"a {opposite} seven\"")
                continue
            if measure not in measured:
                measured[measure] = np.asarray([MEASURES[measure](x) for x in decoded.arrays], dtype=np.float64)
            higher, lower = (measured[measure][[p[side] for p in pairs]] for side in (0, 1))
            wins = (higher > lower).astype(np.float64)
            scores.add("samples", [decoded.keys[a] for a, _b in pairs], "image", f"{word}_vs_{opposite}", wins)
            scores.summary[name] = float(wins.mean())
            scores.summary[f"{name}/pairs"] = float(len(pairs))
            scores.summary[f"{name}/mean_difference"] = float((higher - lower).mean())
            print(f"[{ctx.name}] image {word} vs {opposite}: the {word!r} sample has more {measure} in "
                  f"{wins.mean():.3f} of {len(pairs)} matched pairs (noise: about 0.5)", flush=True)
        for measure, values in measured.items():
            scores.add("samples", decoded.keys, "image", measure, values)

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
        import pyarrow.parquet as pq

        from arpipe.stages.evaluation import score_distributions

        spec, ctx = self.spec, self.ctx
        scores = Scores()
        ctx.run_log.link_model(self._model_id())   # the metrics show on the logged model's MLflow page too
        parts = [(name, part) for name, part, wanted in [
            ("held-out likelihood", self.likelihood, spec.model),
            ("reconstruction", self.reconstruction, spec.reconstruction),
            ("sample metrics", self.samples, spec.samples),
            ("classification", self.classification, spec.classifier.files()),
            ("prompt attributes", self.attributes, spec.prompt_attributes),
            ("control agreement", self.control_following, spec.control_agreement)] if wanted]
        progress = Progress(ctx.name, len(parts), what="parts")
        for done, (name, part) in enumerate(parts, 1):
            part(scores)
            progress.update(done, finished=name)
        folder = ctx.work_dir / "metrics"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(scores.table(), folder / "scores.parquet")
        by_metric: dict[str, list[float]] = {}
        for set_, _key, modality, metric, value in scores.rows:
            by_metric.setdefault(f"{modality} {metric} ({set_})", []).append(value)
        import numpy as np

        score_distributions({k: np.asarray(v) for k, v in by_metric.items()}, folder / "scores.png",
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


@contextlib.contextmanager
def _as_user_error(where: str):
    """A classifier's problem as one line naming its file."""
    from arpipe.stages.evaluation import ClassifierError

    try:
        yield
    except ClassifierError as err:
        raise UserError(err.what, where=where, fix=err.fix) from None


def _tag(text: str) -> str:
    """A short, stable name part for a store uri or a list of indices."""
    return digest_bytes(text.encode()).split(":", 1)[1][:10]


def _metric_part(label: str) -> str:
    """A class label as one segment of an MLflow metric name (letters, digits, ``_-. ``)."""
    return re.sub(r"[^\w.\- ]", "_", label) or "_"


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """``metrics.json`` of an evaluate output folder."""
    return json.loads((Path(folder) / "metrics.json").read_text())
