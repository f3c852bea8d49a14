"""next_level (G3PT-style, an octree level per forward at 3-D coordinates) against next_token on point clouds.

Runs examples/point_clouds_levels.yaml through ``arpipe run`` (embedded Ray) in a scratch folder: 200
brain-surface clouds (1024 points on the MNI152 brain's surfaces, octree depth 4: 250-300 tokens a cloud) train
two tiny models of the same size, seed, data, batch and steps, ``train_flat`` (next_token: flat order, 1-D
positions) and ``train_level`` (next_level); one after the other, alone on the machine (the samples and
evaluations run after both). Each is sampled and evaluated by its evaluate stage.

Prints, per paradigm: the held-out NLL (nats per token of the 20 held-out clouds' tokens, each model under its
own factorization: the same tokens, so the same unit), the train stage's last held-out loss, MMD, COV and 1-NNA
of the samples against the training clouds (Chamfer and EMD; 1-NNA 0.5 is ideal, COV 1.0), the samples kept
and rejected (trees that do not close), the forward passes that drew them (same batches: one per token for
next_token, one per level for next_level), and training and sampling wall times; then
the ratios, next_level over next_token. Results also go to ``benchmarks/results/next_level.json``.

    .venv/bin/python benchmarks/next_level.py [--steps 200] [--samples 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "point_clouds_levels.yaml"
PARADIGMS = {"next_token": "flat", "next_level": "level"}
SAMPLE_METRICS = [f"pointcloud/{m}_{d}" for m in ("mmd", "cov", "1nna") for d in ("cd", "emd")]


def arpipe(work: Path, *args: str) -> None:
    run = subprocess.run([str(ROOT / ".venv" / "bin" / "arpipe"), "run", PIPELINE, *args], cwd=work, text=True,
                         capture_output=True)
    if run.returncode != 0:
        raise SystemExit(f"arpipe run failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def stage_run(client, experiment_id: str, stage: str):
    [found, *_] = client.search_runs([experiment_id], filter_string=f"tags.`arpipe.stage` = '{stage}' and "
                                     "tags.`arpipe.cache` = 'miss'", order_by=["attributes.start_time DESC"])
    return found


def only(work: Path, pattern: str) -> Path:
    [found] = [p for p in work.glob(pattern) if p.name != "latest.json"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=32, help="clouds sampled from each model")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a scratch folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="arpipe-next-level-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in (PIPELINE, "point_clouds_steps.py"):
        shutil.copy(ROOT / "examples" / name, work / name)
    overrides = []
    for short in PARADIGMS.values():
        overrides += [f"stages.train_{short}.steps={args.steps}", f"stages.train_{short}.checkpoint_every={args.steps}",
                      f"stages.train_{short}.eval_every={max(1, args.steps // 4)}",
                      f"stages.sample_{short}.num_samples={args.samples}"]
    flags = [a for o in overrides for a in ("-s", o)]
    for stage in ("train_flat", "train_level"):   # the two trainings one after the other, nothing beside them
        arpipe(work, *flags, "--until", stage)
    arpipe(work, *flags)                          # then the samples and the evaluations

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("point-clouds-levels").experiment_id
    rows = {}
    for paradigm, short in PARADIGMS.items():
        metrics = json.loads(only(work, f"arpipe-runs/evaluate_{short}/*/metrics/metrics.json").read_text())["metrics"]
        train = stage_run(client, experiment, f"train_{short}")
        sample = stage_run(client, experiment, f"sample_{short}")
        heldout = client.get_metric_history(train.info.run_id, "heldout_loss")
        kept, rejects = sample.data.metrics["samples"], sample.data.metrics["rejects"]
        rows[paradigm] = {
            "heldout_nll": metrics["heldout/nll_per_token"], "train_heldout_loss": heldout[-1].value,
            **{m.split("/")[1]: metrics.get(m) for m in SAMPLE_METRICS},
            "samples": kept, "rejects": rejects,
            "forward_passes": sample.data.metrics["forward_passes"],
            "train_seconds": (train.info.end_time - train.info.start_time) / 1000,
            "sample_seconds": (sample.info.end_time - sample.info.start_time) / 1000}
    token, level = rows["next_token"], rows["next_level"]
    ratios = {"next_level / next_token held-out NLL": level["heldout_nll"] / token["heldout_nll"],
              "next_level / next_token forward passes": level["forward_passes"] / token["forward_passes"],
              "next_level / next_token 1-NNA's distance from 0.5 (CD)":
                  abs(level["1nna_cd"] - 0.5) / max(abs(token["1nna_cd"] - 0.5), 1e-9),
              "next_level / next_token MMD (CD)": level["mmd_cd"] / token["mmd_cd"],
              "next_level / next_token COV (CD)": level["cov_cd"] / max(token["cov_cd"], 1e-9),
              "next_level / next_token training wall time": level["train_seconds"] / token["train_seconds"]}
    out = ROOT / "benchmarks" / "results" / "next_level.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "samples": args.samples, "rows": rows, "ratios": ratios},
                              indent=2))
    columns = [("heldout_nll", "held-out NLL nats/token", ".4f"), ("train_heldout_loss", "train's held-out loss", ".4f"),
               *[(m.split("/")[1], m.split("/")[1].upper().replace("_", " "), ".4f") for m in SAMPLE_METRICS],
               ("samples", "samples kept", ".0f"), ("rejects", "samples rejected", ".0f"),
               ("forward_passes", "forward passes (all samples)", ".0f"),
               ("train_seconds", "training wall time s", ".0f"), ("sample_seconds", "sampling wall time s", ".0f")]
    print(f"{args.steps} steps each, {args.samples} samples each; {'':4s}{'next_token':>12s} {'next_level':>12s}")
    for key, title, fmt in columns:
        print(f"{title:44s} {token[key]:>12{fmt}} {level[key]:>12{fmt}}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
