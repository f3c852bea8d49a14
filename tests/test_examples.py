"""The README's quickstart pipeline runs as written (tiny training budget here): four modalities of real data
to tokens, one model, samples of each modality and their metrics, all in MLflow."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from helpers import arpipe, stage_lines

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_end_to_end(tmp_path, ray_cluster):
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("arpipe-runs", "mlflow.db", "mlruns"))
    run = arpipe("run", "quickstart.yaml", "-s", "stages.train.steps=40", "-s", "stages.sample.num_samples=6",
                 cwd=folder, env={"RAY_ADDRESS": ray_cluster}, timeout=900, check=True)
    states = {s: st[-1] for s, st in stage_lines(run.stdout).items()}
    assert set(states.values()) == {"done"} and len(states) == 13, states
    assert "arpipe ui" in run.stdout and "contact sheets (image, video, volume, pointcloud):" in run.stdout
    assert "[evaluate] " in run.stdout and "\x1b[" not in run.stdout + run.stderr   # piped: no colours
    _console_is_quiet_with_live_training(run, folder)
    assert len(list(folder.glob("arpipe-runs/data/*/images/*/*.png"))) + \
        len(list(folder.glob("arpipe-runs/data/*/heldout/*/*.png"))) == 1797

    media = next(folder.glob("arpipe-runs/sample/*/media"))
    assert {p.name for p in media.glob("contact_*.png")} == {
        "contact_image.png", "contact_video.png", "contact_volume.png", "contact_pointcloud.png"}
    assert {p.suffix for p in media.glob("*/*")} >= {".png", ".gif", ".mp4", ".tif", ".mrc"}
    metrics = json.loads(next(folder.glob("arpipe-runs/evaluate/*/metrics/metrics.json")).read_text())
    assert {"heldout/bits_per_token", "reconstruction/psnr", "image/intensity_mean_gap"} <= set(metrics["metrics"])
    assert "image/fid" in metrics["skipped"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = {r.data.tags["arpipe.stage"]: r for r in client.search_runs([exp.experiment_id])
            if "arpipe.stage" in r.data.tags}
    assert {"images", "train", "sample", "evaluate"} <= set(runs)
    sheets = {a.path for a in client.list_artifacts(runs["sample"].info.run_id, "contact_sheets")}
    assert len(sheets) == 4


def _console_is_quiet_with_live_training(run, folder: Path) -> None:
    """What a user reads: arpipe's lines only (Ray's and DeepSpeed's go to each stage's log file), under 120
    of them, and a training line at least every 10 s (by the lines' own elapsed times)."""
    console = (run.stdout + run.stderr).splitlines()
    assert len(console) < 120, f"{len(console)} lines:\n" + "\n".join(console)
    for chatter in ("PlacementGroupCleaner", "[WARNING]", "TrainController", "Warning:", "pid="):
        assert chatter not in run.stdout + run.stderr, chatter
    training = [(int(m[1]), int(m[2] or 0) * 60 + int(m[3])) for m in re.finditer(
        r"^\[train\] step (\d+)/40 .* elapsed (?:(\d+) min )?(\d+) s", run.stdout, re.M)]
    steps = [step for step, _ in training]
    assert steps[0] == 1 and steps[-1] == 40 and steps == sorted(set(steps)), training   # each line once
    for (step_a, a), (step_b, b) in zip(training, training[1:]):
        # the first step after 10 s prints: 10 s plus at most one step (this stretch's mean), plus rounding
        assert b - a <= 11 + (b - a) / (step_b - step_a), training
    logged = re.search(r"^  train +running .*; log: (\S+)$", run.stdout, re.M)[1]
    log = (folder / logged).read_text()
    assert "RayTrainWorker" in log and "[train] step 40/40" in log

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    train = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                               "tags.`arpipe.stage` = 'train'")[0]
    assert [a.path for a in client.list_artifacts(train.info.run_id, "logs")] == [f"logs/{Path(logged).name}"]


def test_every_example_validates_and_plans(tmp_path):
    """Each example as a user first meets it: `arpipe validate` accepts it and `arpipe plan` lists every stage to
    run. (The quickstart runs above; every other example runs end to end in `make test-full`,
    tests/test_examples_more.py, where its stage kinds and modalities are the quickstart's.)"""
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("arpipe-runs", "mlflow.db", "mlruns"))
    pipelines = sorted(p.name for p in folder.glob("*.yaml"))
    assert {"quickstart.yaml", "faces_next_scale.yaml", "em_volume.yaml", "point_clouds.yaml",
            "s3_storage.yaml"} <= set(pipelines)
    for name in pipelines:
        env = {"ARPIPE_STORAGE": str(tmp_path / "storage")}   # s3_storage.yaml's storage, here a local folder
        validated = arpipe("validate", name, cwd=folder, env=env, check=True)
        assert ": ok: " in validated.stdout, validated.stdout
        stages = validated.stdout.split(" in order ")[1].strip().split(" -> ")
        planned = arpipe("plan", name, cwd=folder, env=env, check=True)
        rows = {line.split()[0]: line.split()[2] for line in planned.stdout.splitlines()
                if line.split() and line.split()[0] in stages}
        assert rows == {stage: "run" for stage in stages}, planned.stdout


def test_captioned_digits_say_what_each_image_shows():
    """The captioned-digits example's captions name each image's digit, and its "thick"/"thin" follow the strokes:
    in matched pairs within a class, the thick digit covers more pixels (a measure the captions were not
    computed from) in >= 80% of pairs. The same check on captions shuffled within each class fails."""
    import sys

    from sklearn.datasets import load_digits

    sys.path.insert(0, str(EXAMPLES))
    try:
        from captioned_digits_steps import NUMBERS, describe
    finally:
        sys.path.remove(str(EXAMPLES))
    digits = load_digits()
    images, labels = digits.images, digits.target
    captions = describe(images, labels)
    assert all(c.endswith(" " + NUMBERS[label]) for c, label in zip(captions, labels))
    assert {"a thick, slanted seven", "a thin two", "an eight"} <= set(captions)

    def thick_beats_thin(captions: list[str]) -> float:
        area = (images > 8).reshape(len(images), -1).sum(axis=1)   # pixels over half ink: stroke area
        wins = []
        for label in range(10):
            members = np.flatnonzero(labels == label)
            thick = [i for i in members if "thick" in captions[i]]
            thin = [i for i in members if "thin" in captions[i]]
            wins += [area[a] > area[b] for a, b in zip(thick, thin)]
        return float(np.mean(wins))

    shuffled = list(captions)
    rng = np.random.default_rng(0)
    for label in range(10):
        members = np.flatnonzero(labels == label)
        for i, j in zip(members, rng.permutation(members)):
            shuffled[i] = captions[j]
    real, noise = thick_beats_thin(captions), thick_beats_thin(shuffled)
    print(f"thick beats thin in {real:.3f} of pairs; with captions shuffled within each class {noise:.3f}")
    assert real >= 0.8 and noise < 0.6
