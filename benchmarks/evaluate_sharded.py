"""Sharded evaluation (issue 22): the evaluate stage with 2 actors vs 1 on 4,000 digits samples, and the driver's
peak RSS scoring 1,000 vs 4,000 samples per set.

The data are scikit-learn's digits at 16x16 (bicubic), 4,000 per set: the 1,797 images, then again shifted
by one and two pixels (the "samples" set right, the reference set down), so every image is a real digit
and no two are equal. A project built here (once, ``benchmarks/results/evaluate_sharded/``) tokenizes
both sets with an msvq (scales 1, 2, 4, 8, 16), fits a logistic-regression judge on the reference and
trains a tiny next_scale model for 60 steps. Each measured evaluation is one driver process (the stage run
in it, on a local Ray of 2 CPUs that the benchmark starts): held-out NLL of the reference under the model,
then both sets decoded, through a small convolutional feature network fed at Inception-v3's 299x299
(FID, KID, precision and recall; about 0.1 GFLOP an image, 1/40 of Inception's) and the judge (CAS). Wall time is the stage's, actor start and model load included; the 1- and
2-actor runs alternate, best of ``--repeats``. Peak RSS is the driver process's ``ru_maxrss``. Results go to
``benchmarks/results/evaluate_sharded.json``; the ratio lines come last.

    .venv/bin/python benchmarks/evaluate_sharded.py [--samples 4000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
RESULTS = ROOT / "benchmarks" / "results"
PROJECT = RESULTS / "evaluate_sharded"

PIPELINE = """
name: evalbench
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {{modality: image, uri: ./data/samples, channels: 1}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8, 16], codebook_size: 64}}
    fit: {{max_samples: 800, heldout: 32}}
  samples:
    kind: tokenize
    source: {{modality: image, uri: ./data/samples, channels: 1}}
    tokenizer: ${{tok.tokenizer}}
    workers: 2
  reference:
    kind: tokenize
    source: {{modality: image, uri: ./data/reference, channels: 1}}
    tokenizer: ${{tok.tokenizer}}
    workers: 2
  judge:
    kind: python
    callable: digits_steps:fit_classifier
    inputs: {{images: {reference}}}
    config: {{channels: 1, image_size: 16}}
  train:
    kind: train
    data: [{{store: "${{samples.store}}"}}]
    model: {{preset: tiny, paradigm: next_scale, n_layer: 2, n_embd: 64, n_head: 4}}
    global_batch: 16
    steps: 60
    checkpoint_every: 60
"""


def write_data(root: Path, count: int) -> None:
    """``count`` real digits per set at 16x16: the originals, then shifted (samples right, reference down)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, axis in (("samples", 1), ("reference", 0)):
        for i in range(count):
            image = np.roll(digits.images[i % len(digits.images)], i // len(digits.images), axis=axis)
            folder = root / "data" / name / str(digits.target[i % len(digits.images)])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((16, 16), Image.BICUBIC).save(
                folder / f"{i:05d}.png")


def build(address: str, count: int) -> dict[str, str]:
    """The project's stores, judge and model (built once; a rerun is a cache hit)."""
    import shutil

    import torch

    marker = PROJECT / f"built-{count}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    if PROJECT.exists():
        shutil.rmtree(PROJECT)
    PROJECT.mkdir(parents=True)
    write_data(PROJECT, count)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sample_evaluate import TinyFeatures

    torch.jit.save(torch.jit.script(TinyFeatures()), str(PROJECT / "features.pt"))
    shutil.copyfile(ROOT / "examples" / "digits_steps.py", PROJECT / "digits_steps.py")
    (PROJECT / "bench.yaml").write_text(PIPELINE.format(reference=PROJECT / "data" / "reference"))
    subprocess.run([sys.executable, "-m", "arpipe.pipeline.cli", "run", "bench.yaml", "--address", address],
                   cwd=PROJECT, check=True)
    outputs = {}
    for stage, name in (("samples", "store"), ("reference", "store"), ("judge", "classifier.skops"),
                        ("train", "model")):
        committed = next(p.parent for p in PROJECT.glob(f"runs/{stage}/*/outputs.json"))
        outputs[stage] = str(committed / name)
    marker.write_text(json.dumps(outputs))
    return outputs


def drive(config: dict) -> None:
    """One evaluation in this process (the driver): prints its wall time and the process's peak RSS as JSON."""
    import ray

    from arpipe.pipeline.stage import StageContext
    from arpipe.schemas.sample import EvaluateStage as EvaluateSpec
    from arpipe.stages.evaluate import EvaluateStage

    ray.init(address=config.pop("address"), log_to_driver=False)
    folder = Path(config.pop("folder"))
    spec = EvaluateSpec.model_validate({"kind": "evaluate", **config})
    ctx = StageContext(name="evaluate", kind="evaluate", fingerprint="bench", out_uri=str(folder), work_dir=folder,
                       pipeline_dir=PROJECT)
    started = time.perf_counter()
    EvaluateStage(spec, ctx).run()
    seconds = time.perf_counter() - started
    metrics = json.loads((folder / "metrics" / "metrics.json").read_text())["metrics"]
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  / 1024, "metrics": metrics}), flush=True)


def measure(address: str, outputs: dict[str, str], *, samples: int, actors: int) -> dict:
    config = {"address": address, "folder": tempfile.mkdtemp(prefix="evalbench-"),
              "samples": outputs["samples"], "reference": outputs["reference"], "model": outputs["train"],
              "heldout": outputs["reference"], "max_samples": samples, "actors": actors,
              "features": {"image": str(PROJECT / "features.pt"), "image_size": 299},
              "classifier": {"image": outputs["judge"], "image_size": 16}}
    run = subprocess.run([sys.executable, __file__, "--drive", json.dumps(config)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"the evaluation failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {samples:5d} samples per set, {actors} actor(s): {result['seconds']:6.1f} s, driver peak RSS "
          f"{result['peak_rss_mb']:.0f} MB, FID {result['metrics']['image/fid']:.5f}, CAS "
          f"{result['metrics']['image/cas']:.3f}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000, help="samples per set (and held-out samples)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per actor count (best is kept)")
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        drive(json.loads(args.drive))
        return

    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    address = ray.get_runtime_context().gcs_address
    outputs = build(address, args.samples)
    small = max(2, args.samples // 4)
    timed: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):   # alternating, so that a slow spell of the machine hits both
        for actors in (1, 2):
            timed[actors].append(measure(address, outputs, samples=args.samples, actors=actors))
    memory = {n: measure(address, outputs, samples=n, actors=2) for n in (small, args.samples)}
    best = {a: min(r["seconds"] for r in runs) for a, runs in timed.items()}
    same = all(abs(timed[1][0]["metrics"][k] - timed[2][0]["metrics"][k]) <= 1e-9 * max(1.0, abs(v))
               for k, v in timed[1][0]["metrics"].items() if v is not None)
    result = {
        "samples_per_set": args.samples, "repeats": args.repeats,
        "seconds": {f"{a} actor(s)": s for a, s in best.items()},
        "peak_rss_mb": {f"{n} samples": r["peak_rss_mb"] for n, r in memory.items()},
        "metrics_equal_1_vs_2_actors": same,
        "ratios": {"2 actors / 1 speed-up": best[1] / best[2],
                   "driver peak RSS, all / a quarter of the samples":
                       memory[args.samples]["peak_rss_mb"] / memory[small]["peak_rss_mb"]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evaluate_sharded.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"metrics equal with 1 and 2 actors (1e-9): {same}")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
