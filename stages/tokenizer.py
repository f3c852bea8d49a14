"""Stage kind ``tokenizer``: fit a tokenizer on a sample of a source.

Output ``tokenizer``: an artifact folder (``weights.safetensors`` +
``tokenizer.json``) whose digest downstream fingerprints depend on. Logged to
MLflow: reconstruction metrics on held-out samples, codebook usage, the fit
loss curve (vqvae), a before/after picture, and ``fit_report.json`` with the
samples rejected while reading and the files the reader skips (counted per
kind in the log line and in the ``skipped`` metrics, as ``tokenize`` does).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from arpipe.pipeline.digest import listing_digest
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.stage import Output, Stage
from arpipe.pipeline.storage import control_uri, normalize
from arpipe.schemas.tokenize import TokenizerStage as TokenizerSpec


def read_for_fit(source, limit: int) -> tuple[list, list[dict[str, str]], list]:
    """The first ``limit`` readable samples in source order, the rejected ones with reasons (as far as it
    read), and the files the reader skips (``SkippedFile``: every one below the source, listed up front)."""
    from arpipe.stages.modalities import open_reader
    from arpipe.stages.modalities.accounting import read_quarantining

    reader = open_reader(source.modality, source.uri, **source.reader_options())
    samples: list = []
    rejects: list[dict[str, str]] = []
    units = reader.units()
    for unit in units:
        for sample in read_quarantining(reader, unit, lambda src, why: rejects.append({"source": src, "reason": why})):
            samples.append(sample)
            if len(samples) >= limit:
                return samples, rejects, reader.skipped
    return samples, rejects, reader.skipped


def reconstruction_metrics(tok, modality: str, originals: list, recon: list, tokens: list) -> dict[str, float]:
    """Codebook usage, and the held-out round trip as the evaluate stage scores it (``round_trip``)."""
    import numpy as np

    from arpipe.stages.modalities import codebook_usage
    from arpipe.stages.modalities.metrics import round_trip

    metrics: dict[str, float] = {}
    if tokens:
        usage = codebook_usage(np.concatenate([np.asarray(t).reshape(-1) for t in tokens]), tok.vocab_size)
        metrics.update({f"codebook_{k}": float(v) for k, v in usage.items()})
    metrics.update({name: float(np.mean(values)) for name, values in round_trip(modality, originals, recon).items()})
    return metrics


class TokenizerStage(Stage):
    kind = "tokenizer"
    version = "1"
    spec: TokenizerSpec

    @classmethod
    def source_digest(cls, spec: TokenizerSpec, pipeline_dir: Path) -> str | None:
        return listing_digest(spec.source.uri, pipeline_dir)

    @classmethod
    def ray_options(cls, spec: TokenizerSpec) -> dict[str, Any]:
        if spec.tokenizer.type == "vqvae":  # the fit runs on Ray Train workers: they take the CPUs and GPUs
            return {"num_cpus": 0}
        return {"num_cpus": 1}

    def run(self) -> dict[str, Output]:
        import numpy as np

        from arpipe.stages.modalities import make_tokenizer
        from arpipe.stages.modalities.accounting import skip_metrics
        from arpipe.stages.modalities.previews import before_after

        spec, ctx = self.spec, self.ctx
        source = spec.source.model_copy(update={"uri": normalize(spec.source.uri, ctx.pipeline_dir)})
        started = time.time()
        samples, rejects, skipped = read_for_fit(source, spec.fit.max_samples + spec.fit.heldout)
        if len(samples) <= spec.fit.heldout:
            raise UserError(f"only {len(samples)} readable samples, fewer than fit.heldout + 1", where=source.uri,
                            fix="point source.uri at more data or lower fit.heldout")
        # held-out samples spread evenly over what was read (sources are often sorted by class)
        step = len(samples) / spec.fit.heldout if spec.fit.heldout else 0
        held_idx = {int(k * step) for k in range(spec.fit.heldout)}
        train = [s for i, s in enumerate(samples) if i not in held_idx]
        heldout = [s for i, s in enumerate(samples) if i in held_idx]
        if spec.tokenizer.type == "text":
            return self._fit_text(source, train, heldout, rejects, skipped, len(samples), started)
        args = spec.tokenizer.constructor_args(train[0].shape if source.modality != "pointcloud" else None)
        if "modality" in _init_params(spec.tokenizer.type):
            args["modality"] = source.modality
        tok = make_tokenizer(spec.tokenizer.type, **args)
        arrays = [s.data for s in train]
        fit_options = spec.tokenizer.fit.model_dump() if spec.tokenizer.type == "vqvae" else {}
        if spec.tokenizer.type == "vqvae":
            from arpipe.stages.modalities.vqvae_fit import fit_vqvae_on_ray

            tok = fit_vqvae_on_ray(args, arrays, fit_options, workers=spec.workers,
                                   use_gpu=spec.resources.num_gpus > 0,
                                   storage_dir=control_uri(ctx.out_uri, "fit"))
        else:
            tok.fit(arrays, **fit_options)
        digest = tok.save(str(ctx.work_dir / "tokenizer"))
        held_arrays = [s.data for s in heldout]
        tokens = tok.encode_arrays(held_arrays) if held_arrays else tok.encode_arrays(arrays[:64])
        recon = tok.decode_arrays(tokens) if held_arrays else []
        if source.modality == "pointcloud":
            recon = [np.asarray(r) for r in recon]
        metrics = reconstruction_metrics(tok, source.modality, held_arrays, recon, tokens)
        metrics.update({"fit_samples": len(train), "heldout_samples": len(heldout), "rejects": len(rejects),
                        **skip_metrics(skipped), "fit_seconds": time.time() - started})
        for point in getattr(tok, "fit_info", {}).get("curve", []):   # vqvae: {step, recon, commitment}
            ctx.log_metrics({f"fit_{k}": float(v) for k, v in point.items() if k != "step"}, step=int(point["step"]))
        if held_arrays:
            picture = ctx.work_dir / "before_after.png"
            before_after(held_arrays, recon, source.modality).save(picture)
            ctx.log_artifact(picture)
        return self._report(source, tok, digest, metrics, rejects, skipped, read=len(samples),
                            fitted=f"{spec.tokenizer.type} on {len(train)} samples")

    def _report(self, source, tok, digest: str, metrics: dict[str, float], rejects: list, skipped: list, *,
                read: int, fitted: str) -> dict[str, Output]:
        """Log the fit's metrics and fit_report.json, print its two lines; the stage's output."""
        from arpipe.stages.modalities.accounting import skip_summary

        ctx = self.ctx
        ctx.log_metrics(metrics)
        report = {"metrics": metrics, "rejects": rejects, "digest": digest, "vocab_size": tok.vocab_size,
                  "skipped": [{"source": f.uri, "kind": f.kind, "reason": f.reason} for f in skipped]}
        (ctx.work_dir / "fit_report.json").write_text(json.dumps(report, indent=1, default=float))
        ctx.log_artifact(ctx.work_dir / "fit_report.json")
        print(f"[{ctx.name}] read {read} samples from {source.uri}: {len(rejects)} rejected, "
              f"{skip_summary(skipped)}" + ("; reasons in fit_report.json" if rejects or skipped else ""), flush=True)
        print(f"[{ctx.name}] fitted {fitted}: "
              + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("skipped_")), flush=True)
        return {"tokenizer": Output(path="tokenizer", digest=digest)}

    def _fit_text(self, source, train: list, heldout: list, rejects: list, skipped: list, read: int,
                  started: float) -> dict[str, Output]:
        """A text tokenizer learns from the samples' captions; held-out captions measure its round trip."""
        import numpy as np

        from arpipe.stages.modalities import make_tokenizer
        from arpipe.stages.modalities.accounting import skip_metrics

        spec, ctx = self.spec, self.ctx
        texts = [s.caption for s in train if s.caption]
        held = [s.caption for s in heldout if s.caption]
        tok = make_tokenizer("text", **spec.tokenizer.constructor_args(None)).fit(texts)
        digest = tok.save(str(ctx.work_dir / "tokenizer"))
        tokens = tok.encode_texts(held or texts[:64])
        metrics = {"fit_samples": len(train), "fit_captions": len(texts), "heldout_captions": len(held),
                   "vocab_size": tok.vocab_size, "tokens_per_caption": float(np.mean([len(t) for t in tokens])),
                   "rejects": len(rejects), **skip_metrics(skipped), "fit_seconds": time.time() - started}
        if held:   # byte-level: a caption decodes to itself up to normalisation (NFKC, lower-case)
            metrics["heldout_exact"] = float(np.mean([d == t for d, t in zip(tok.decode_texts(tokens),
                                                                             tok.normalize_all(held))]))
        return self._report(source, tok, digest, metrics, rejects, skipped, read=read,
                            fitted=f"text on {len(texts)} captions")


def _init_params(type_: str) -> set[str]:
    import inspect

    from arpipe.stages.modalities import tokenizer_class

    return set(inspect.signature(tokenizer_class(type_).__init__).parameters)
