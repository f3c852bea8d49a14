"""Damaged checkpoints and models: each is found before anything reads it, and the user is told.

A train stage's checkpoints carry a marker per rank listing every file's size and digest; a
rerun checks the checkpoint Ray Train hands over and, when a shard was truncated or the marker
deleted, resumes from the previous whole checkpoint and says so in one line (and in MLflow). A
model folder records its weights' digests: a flipped byte is refused with one line by
``arpipe.load_model`` and the sample stage, and the cache does not trust the train stage's output.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from faults.kinds import MODEL_EXPERIMENT, MODEL_PIPELINE
from helpers import RunsAhead, arpipe, stage_lines, write

#: the line a rerun prints for each damaged checkpoint it skipped (Ray prefixes a worker's lines with its name)
DAMAGED = re.compile(r"\[train\] checkpoint step (\d+) is damaged \((.+)\): resuming from step (\d+)$", re.M)


@pytest.fixture(scope="module")
def trained(assets) -> Path:
    """The suite's small digits model (``faults.kinds.PREP_MODEL``, trained once in the background): a project
    whose train stage ran undisturbed, checkpoints at steps 4 and 8 (both kept), ZeRO-1, one worker."""
    return Path(assets.with_model()["project"])


def copy_of(trained: Path, folder: Path) -> Path:
    """A copy of the trained project (Ray Train's storage names its checkpoints relative to it)."""
    return Path(shutil.copytree(trained, folder / "project", symlinks=True))


@pytest.fixture
def project(trained, tmp_path) -> Path:
    return copy_of(trained, tmp_path)


def train_dir(project: Path) -> Path:
    [out] = [p for p in (project / "runs" / "train").iterdir() if p.is_dir()]
    return out


def checkpoints(project: Path) -> list[tuple[int, Path]]:
    """Ray Train's committed checkpoints of the train stage, (step, folder), oldest first."""
    experiment = train_dir(project) / ".arpipe" / "ray" / "train"
    snapshot = json.loads((experiment / "checkpoint_manager_snapshot.json").read_text())
    return [(int(r["metrics"]["step"]), experiment / r["checkpoint_dir_name"]) for r in snapshot["checkpoint_results"]]


def weights(project: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(train_dir(project) / "model" / "model.safetensors"))


def uncommit(project: Path) -> None:
    """As if the run was cut off after its last checkpoint: the train stage's outputs are not committed."""
    (train_dir(project) / "outputs.json").unlink()


def truncate_the_optimizer_shard(project: Path) -> dict:
    """The newest checkpoint's ZeRO optimizer partition cut to half its size."""
    _older, (_newest, folder) = checkpoints(project)
    shard = next(folder.rglob("zero_pp_rank_0_*optim_states.pt"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    uncommit(project)
    return {"shard": shard.relative_to(folder).as_posix(), "size": size}


def delete_the_marker(project: Path) -> dict:
    _older, (_newest, folder) = checkpoints(project)
    (folder / "arpipe-checkpoint-0.json").unlink()
    uncommit(project)
    return {}


def flip_a_weights_byte(project: Path) -> dict:
    """One byte of the model's weights changed, the size kept: only the digest can tell."""
    weights_file = train_dir(project) / "model" / "model.safetensors"
    good = weights_file.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x5A
    weights_file.write_bytes(bytes(data))
    return {"good": good}


def nothing(project: Path) -> dict:
    return {"stale": {folder.name for _step, folder in checkpoints(project)}}


#: each story's damage, done to a copy of the trained project, and the options of the user's `arpipe run`
DAMAGE = {"truncated": (truncate_the_optimizer_shard, []), "no_marker": (delete_the_marker, []),
          "forced": (nothing, ["--force", "train"]), "flipped": (flip_a_weights_byte, [])}


@pytest.fixture(scope="module")
def reruns(trained, tmp_path_factory, ray_cluster):
    """Each story's damaged project and the user's `arpipe run` of it up to its train stage (its sample stage is
    the campaigns'), the runs started together ahead of the tests: each mostly waits on Ray Train's start-up.
    ``reruns(name)`` -> (project, what the damage recorded, the finished run)."""
    ahead = RunsAhead()
    projects = {}
    for name, (damage, options) in DAMAGE.items():
        project = copy_of(trained, tmp_path_factory.mktemp(name))
        projects[name] = project, damage(project)
        ahead.start(name, "run", MODEL_PIPELINE, "--until", "train", *options, cwd=project,
                    env={"RAY_ADDRESS": ray_cluster}, timeout=600)
    yield lambda name: (*projects[name], ahead.result(name))
    ahead.close()


def resumed(run) -> str:
    assert run.returncode == 0, run.stdout + run.stderr
    assert stage_lines(run.stdout)["train"] == ["resuming", "done"], run.stdout
    return run.stdout


def skipped_tag(project: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(MODEL_EXPERIMENT)
    [latest, *_] = client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.stage` = 'train'",
                                      order_by=["attributes.start_time DESC"])
    assert latest.data.metrics.get("checkpoints_skipped") == 1
    return latest.data.tags.get("arpipe.checkpoints_skipped", "")


def test_a_truncated_deepspeed_shard_is_skipped_for_the_previous_checkpoint(reruns, trained):
    assert [step for step, _folder in checkpoints(trained)] == [4, 8]   # the newest, 8, is the one damaged
    project, damage, rerun = reruns("truncated")
    out = resumed(rerun)
    shard, size = damage["shard"], damage["size"]
    assert DAMAGED.findall(out) == [("8", f"{shard} is truncated: {size // 2} of {size} bytes", "4")], out
    assert "[train] resumed at step 4 (restart 1)" in out
    assert "step 8: " + shard in skipped_tag(project)
    # the resume is exact (data position, optimizer, schedule): the model equals the undisturbed run's
    ours, undisturbed = weights(project), weights(trained)
    assert ours.keys() == undisturbed.keys()
    assert all(np.array_equal(ours[k], undisturbed[k]) for k in ours)


def test_a_checkpoint_without_its_marker_is_never_loaded(reruns):
    _project, _damage, rerun = reruns("no_marker")
    out = resumed(rerun)
    assert DAMAGED.findall(out) == [("8", "its marker arpipe-checkpoint-0.json is missing", "4")], out
    assert "[train] resumed at step 4" in out


@pytest.mark.full   # a third training of the project; --force itself: tests/test_pipeline_run.py
def test_force_trains_again_from_step_0_and_gets_the_same_model(reruns, trained):
    """`--force train` reruns the stage: its checkpoints go with its outputs, so it trains every step again (it
    used to resume from the final checkpoint and train none), and the same seed gives the same model."""
    from mlflow.tracking import MlflowClient

    project, damage, forced = reruns("forced")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert stage_lines(forced.stdout)["train"] == ["running", "done"], forced.stdout
    assert "resumed at step" not in forced.stdout, forced.stdout
    again = checkpoints(project)
    assert [step for step, _ in again] == [4, 8] and not damage["stale"] & {folder.name for _, folder in again}

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(MODEL_EXPERIMENT)
    [latest, *_] = client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.stage` = 'train'",
                                      order_by=["attributes.start_time DESC"])
    assert [m.step for m in client.get_metric_history(latest.info.run_id, "loss")][:1] == [1]
    before, after = weights(trained), weights(project)
    assert before.keys() == after.keys()
    assert all(np.allclose(before[k], after[k], rtol=0, atol=1e-6) for k in before)


def test_a_flipped_byte_in_the_weights_is_refused_and_not_trusted_by_the_cache(project, reruns, ray_cluster):
    import arpipe as api
    from arpipe.pipeline.errors import UserError

    flip_a_weights_byte(project)     # the damage the rerun below met, on a copy of its own
    model = train_dir(project) / "model"
    with pytest.raises(UserError) as refused:
        api.load_model(model)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{model}: model.safetensors does not match its digest"), line

    # a sample stage pointed at the folder stops with that one line (exit 2), before any worker starts
    write(project, {"sample.yaml": f"""
        name: ckpt-sample
        storage: ./sampled
        stages:
          draw: {{kind: sample, model: "{model}", num_samples: 4}}
        """})
    sample = arpipe("run", "sample.yaml", cwd=project, env={"RAY_ADDRESS": ray_cluster}, timeout=300)
    assert sample.returncode == 2, sample.stdout + sample.stderr
    assert "model.safetensors does not match its digest" in sample.stdout + sample.stderr
    assert "Traceback" not in sample.stdout + sample.stderr

    # the train stage's own output is not trusted: plan says why, and a run restores the weights from the
    # final checkpoint (no step is trained again)
    plan = arpipe("plan", MODEL_PIPELINE, cwd=project, check=True)
    [row] = [line for line in plan.stdout.splitlines() if line.split()[:1] == ["train"]]
    assert "model/model.safetensors does not match its recorded digest" in row and " cached " not in row, row
    restored_project, damage, restored = reruns("flipped")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert stage_lines(restored.stdout)["train"] == ["running", "done"], restored.stdout
    assert "[train] resumed at step 8" in restored.stdout
    assert (train_dir(restored_project) / "model" / "model.safetensors").read_bytes() == damage["good"]


def test_models_written_before_digests_still_load_and_truncation_is_named(tmp_path, single_torch_thread):
    import arpipe as api
    from arpipe.pipeline.errors import UserError
    from arpipe.stages.models import ModelConfig, Transformer, VocabLayout
    from arpipe.stages.models.io import save_model

    vocab = VocabLayout.build({"image": 4}, classes=range(2))
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=32, max_seq_len=16))
    folder = save_model(tmp_path / "model", model, vocab=vocab)
    (folder / "tokenizers.json").write_text("{}")
    config = json.loads((folder / "config.json").read_text())
    assert set(config["files"]) == {"model.safetensors", "vocab.json"}

    weights_file = folder / "model.safetensors"
    size = weights_file.stat().st_size
    weights_file.write_bytes(weights_file.read_bytes()[:-64])
    with pytest.raises(UserError, match=f"model.safetensors is truncated: {size - 64} bytes, config.json "
                                        f"records {size}"):
        api.load_model(folder)

    # a folder from before the record: no digests to check, it loads as it always did
    save_model(folder, model, vocab=vocab)
    del config["files"]
    (folder / "config.json").write_text(json.dumps(config))
    assert api.load_model(folder) is not None
