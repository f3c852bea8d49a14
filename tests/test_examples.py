"""The README's quickstart pipeline runs as written (tiny training budget here)."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import arpipe, stage_lines

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_end_to_end(tmp_path, ray_cluster):
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("arpipe-runs", "mlflow.db", "mlruns"))
    run = arpipe("run", "quickstart.yaml", "-s", "stages.train.steps=4", cwd=folder,
                 env={"RAY_ADDRESS": ray_cluster}, timeout=600, check=True)
    assert {s: states[-1] for s, states in stage_lines(run.stdout).items()} == {
        "digits": "done", "tokenizer": "done", "tokenize": "done", "train": "done"}
    assert "arpipe ui" in run.stdout
    model = next(folder.glob("arpipe-runs/train/*/model"))
    assert (model / "model.safetensors").stat().st_size > 0
    assert len(list(folder.glob("arpipe-runs/digits/*/images/*/*.png"))) == 1797
