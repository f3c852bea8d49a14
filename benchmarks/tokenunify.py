"""TokenUnify's mixed objective against next-token prediction alone, at equal steps (issue 21, item 4).

Runs examples/em_tokenunify.yaml through ``arpipe run`` (embedded Ray) in a scratch folder: MNI152 volume
crops (8 x 16 x 16 voxels, 64 patch-VQ tokens each) train two next-token models of the same size, seed, data
and steps, ``train`` on next-token prediction alone and ``train_unify`` on the mixture (random-token 0.2,
next-token 0.6, next-all 0.2 unless ``--weights`` says otherwise). Prints each model's held-out next-token
NLL (nats per token, teacher forced, on the held-out part of the volume) as its train stage logged it at the
last step, the training wall time of each, and the ratio of the NLLs last (the example's sample and evaluate
stages run too). Results also go to
``benchmarks/results/tokenunify.json``.

    .venv/bin/python benchmarks/tokenunify.py [--steps 300] [--weights 0.2,0.6,0.2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--weights", default="0.2,0.6,0.2", help="random_token,next_token,next_all")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a scratch folder)")
    args = parser.parse_args()
    random_token, next_token, next_all = (float(w) for w in args.weights.split(","))
    work = args.keep or Path(tempfile.mkdtemp(prefix="arpipe-tokenunify-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("em_tokenunify.yaml", "em_volume_steps.py"):
        shutil.copy(ROOT / "examples" / name, work / name)
    overrides = [f"stages.{s}.{k}={args.steps}" for s in ("train", "train_unify")
                 for k in ("steps", "eval_every", "checkpoint_every")]
    overrides += [f"stages.train_unify.objective.random_token={random_token}",
                  f"stages.train_unify.objective.next_token={next_token}",
                  f"stages.train_unify.objective.next_all={next_all}"]
    run = subprocess.run([str(ROOT / ".venv" / "bin" / "arpipe"), "run", "em_tokenunify.yaml",
                          *[a for o in overrides for a in ("-s", o)]],
                         cwd=work, text=True, capture_output=True)
    if run.returncode != 0:
        raise SystemExit(f"arpipe run failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("em-tokenunify")
    rows = {}
    for stage in ("train", "train_unify"):
        [found, *_] = client.search_runs([exp.experiment_id], filter_string=f"tags.`arpipe.stage` = '{stage}' "
                                         "and tags.`arpipe.cache` = 'miss'", order_by=["attributes.start_time DESC"])
        history = client.get_metric_history(found.info.run_id, "heldout_loss")
        rows[stage] = {"heldout_nll": history[-1].value, "at_step": history[-1].step,
                       "seconds": (found.info.end_time - found.info.start_time) / 1000}
    out = ROOT / "benchmarks" / "results" / "tokenunify.json"
    out.parent.mkdir(exist_ok=True)
    ratio = rows["train_unify"]["heldout_nll"] / rows["train"]["heldout_nll"]
    out.write_text(json.dumps({"steps": args.steps, "weights": [random_token, next_token, next_all],
                               "rows": rows, "ratios": {"mixed / next-token held-out NLL": ratio}}, indent=2))
    for stage, row in rows.items():
        print(f"{stage:12s} held-out next-token NLL {row['heldout_nll']:.4f} nats/token at step {row['at_step']}, "
              f"trained in {row['seconds']:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"held-out NLL, mixed / next-token alone: {ratio:.3f}")


if __name__ == "__main__":
    main()
