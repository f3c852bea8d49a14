"""`arpipe gc`: a user changes a stage, reruns, and takes back the space the old outputs held.

Stories with two `python` stages (a -> b): gc lists the superseded folder and its bytes, removes it only with
--yes, and the current outputs stay cached; a run in progress keeps what it holds and reads while a stale lock
goes; --keep-last; the same on a real S3 server; --json against its schema. One tiny train stage: its
checkpoints go once it has finished, never before.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
from helpers import arpipe, json_output, spawn, stage_lines, write
from test_pipeline_run import STEPS as RUN_STEPS

from arpipe.pipeline.gc import size_text as size
from arpipe.pipeline.lock import LockInfo, lock_uri
from arpipe.pipeline.storage import join, storage_for

#: the story's `make`, and a `scale` that waits while the file ARPIPE_TEST_GATE names exists
STEPS = RUN_STEPS + """
def gated_scale(config, inputs, out_dir):
    gate = os.environ.get("ARPIPE_TEST_GATE")
    if gate and os.path.exists(gate):
        open(os.path.join(out_dir, "started"), "w").close()
        while os.path.exists(gate):
            time.sleep(0.1)
    with open(inputs["numbers"]) as f:
        numbers = json.load(f)
    path = os.path.join(out_dir, "scaled.json")
    with open(path, "w") as f:
        json.dump([x * config["factor"] for x in numbers], f)
    return {"scaled": path}
"""

PIPELINE = """
name: gc-story
storage: {storage}
stages:
  a: {{kind: python, callable: "steps:make", config: {{n: 5}}}}
  b:
    kind: python
    callable: steps:gated_scale
    inputs: {{numbers: "${{a.numbers}}"}}
    config: {{factor: {factor}}}
"""


def project(folder: Path, factor: int = 2, storage: str = "./runs") -> Path:
    return write(folder, {"steps.py": STEPS, "pipeline.yaml": PIPELINE.format(storage=storage, factor=factor)})


def run(folder: Path, env: dict, *args: str) -> dict[str, list[str]]:
    return stage_lines(arpipe("run", "pipeline.yaml", *args, cwd=folder, env=env, check=True).stdout)


def with_factor(folder: Path, factor: int) -> None:
    pipeline = folder / "pipeline.yaml"
    text = pipeline.read_text()
    pipeline.write_text(text[:text.index("factor:")] + f"factor: {factor}}}\n")


def files(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` and its size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def folder_of(root: Path, stage: str, output: str, value) -> Path:
    """The fingerprint folder of ``stage`` whose ``output`` file holds ``value``."""
    [found] = [p.parent for p in root.glob(f"runs/{stage}/*/{output}") if json.loads(p.read_text()) == value]
    return found


def gc(folder: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    """`arpipe gc pipeline.yaml ARGS`: its table's rows split in columns (stage, what, size, path, why), then the
    summary line as one row."""
    proc = arpipe("gc", "pipeline.yaml", *args, cwd=folder, env=env, check=True)
    *rows, summary = proc.stdout.splitlines()
    return [re.split(r" {2,}", row, maxsplit=4) for row in rows[1:]] + [[summary]]


@pytest.fixture
def env(ray_cluster) -> dict[str, str]:
    return {"RAY_ADDRESS": ray_cluster}


def test_gc_lists_the_superseded_folder_then_removes_only_it(tmp_path, env):
    project(tmp_path)
    run(tmp_path, env)
    old_b = folder_of(tmp_path, "b", "scaled.json", [0, 2, 4, 6, 8])
    with_factor(tmp_path, 3)
    assert run(tmp_path, env) == {"a": ["cached"], "b": ["running", "done"]}
    before = files(tmp_path / "runs")
    old_bytes = sum(files(old_b).values())

    listed = gc(tmp_path)
    assert listed == [["b", "superseded", size(old_bytes), str(old_b),
                       "superseded: config changed: config.factor 2 -> 3"],
                      [f"dry run: 1 item(s), {size(old_bytes)} would be freed; rerun with --yes to remove them"]]
    assert files(tmp_path / "runs") == before   # a dry run removes nothing

    text = arpipe("gc", "pipeline.yaml", "--json", cwd=tmp_path, check=True).stdout
    with pytest.raises(jsonschema.ValidationError):   # the schema check can fail: an unknown state is refused
        json_output("gc", text.replace('"listed"', '"maybe"'))
    as_json = json_output("gc", text)
    assert as_json == {"schema_version": 1, "pipelines": [str(tmp_path / "pipeline.yaml")], "dry_run": True,
                       "items": [{"stage": "b", "what": "superseded", "path": str(old_b), "bytes": old_bytes,
                                  "reason": "superseded: config changed: config.factor 2 -> 3", "state": "listed",
                                  "note": None}],
                       "kept": [], "bytes": old_bytes, "freed": 0}

    removed = gc(tmp_path, "--yes")
    assert removed == [listed[0], [f"removed 1 item(s), freed {size(old_bytes)}"]]
    gone = f"{old_b.relative_to(tmp_path / 'runs').as_posix()}/"
    assert files(tmp_path / "runs") == {rel: n for rel, n in before.items() if not rel.startswith(gone)}
    assert not old_b.exists()

    assert run(tmp_path, env) == {"a": ["cached"], "b": ["cached"]}
    status = json_output("status", arpipe("status", "pipeline.yaml", "--json", cwd=tmp_path, check=True).stdout)
    assert [row["state"] for row in status["stages"]] == ["cached", "cached"]
    assert gc(tmp_path) == [["nothing to remove"]]


def finished_pid() -> int:
    """The id of a process that has ended: a lock naming it on this host is stale."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_running_run_keeps_what_it_holds_and_reads_while_a_stale_lock_goes(tmp_path, env):
    project(tmp_path)
    run(tmp_path, env)
    current_a = folder_of(tmp_path, "a", "numbers.json", [0, 1, 2, 3, 4])
    # a run with another n: its folders are not the pipeline file's (superseded); its b reads its a while it runs
    gate = tmp_path / "gate"
    gate.write_text("hold b")
    other = spawn("run", "pipeline.yaml", "-s", "stages.a.config.n=7", cwd=tmp_path,
                  env={**env, "ARPIPE_TEST_GATE": str(gate)})
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("runs/b/*/started")):
            assert other.poll() is None, other.stdout.read()
            assert time.time() < deadline, "b did not start within 120 s"
            time.sleep(0.2)
        running_b = next(tmp_path.glob("runs/b/*/started")).parent
        read_a = folder_of(tmp_path, "a", "numbers.json", list(range(7)))
        # a lock left by a run that is gone, on the pipeline's current a
        storage_for(str(current_a)).write_text(lock_uri(str(current_a)), json.dumps(
            LockInfo(socket.gethostname(), finished_pid(), "gone-run", time.time() - 5).__dict__))
        stale = current_a / ".arpipe" / "lock"
        stale_bytes = stale.stat().st_size
        before = files(tmp_path / "runs")

        listed = gc(tmp_path)
        assert listed[0][:4] == ["a", "stale-lock", size(stale_bytes), str(stale)]
        assert listed[0][4].startswith("stale lock of run gone-run")
        kept = {row[3]: row for row in listed[1:-1]}
        assert set(kept) == {str(read_a), str(running_b)}
        assert kept[str(read_a)][:3] == ["a", "kept", "-"]
        assert kept[str(read_a)][4] == "the last run of pipeline 'gc-story' (running) used it"
        assert kept[str(running_b)][:3] == ["b", "kept", "-"]
        assert kept[str(running_b)][4].startswith("locked by run ")
        assert listed[-1] == [f"dry run: 1 item(s), {size(stale_bytes)} would be freed; "
                              "rerun with --yes to remove them"]

        removed = gc(tmp_path, "--yes")
        assert removed[:-1] == listed[:-1] and removed[-1] == [f"removed 1 item(s), freed {size(stale_bytes)}"]
        lock_rel = stale.relative_to(tmp_path / "runs").as_posix()
        assert files(tmp_path / "runs") == {rel: n for rel, n in before.items() if rel != lock_rel}
    finally:
        gate.unlink()
        assert other.wait(timeout=120) == 0, other.stdout.read()
    assert json.loads((running_b / "scaled.json").read_text()) == [x * 2 for x in range(7)]

    # that run was the pipeline's last: what it used stays until a run of the file's config comes after it
    last_run = "the last run of pipeline 'gc-story' (done) used it"
    assert gc(tmp_path) == [["a", "kept", "-", str(read_a), last_run], ["b", "kept", "-", str(running_b), last_run],
                            ["nothing to remove"]]
    assert run(tmp_path, env) == {"a": ["cached"], "b": ["cached"]}
    sizes = [sum(files(read_a).values()), sum(files(running_b).values())]
    assert [row[:4] for row in gc(tmp_path, "--yes")] == [
        ["a", "superseded", size(sizes[0]), str(read_a)], ["b", "superseded", size(sizes[1]), str(running_b)],
        [f"removed 2 item(s), freed {size(sum(sizes))}"]]
    assert not read_a.exists() and not running_b.exists() and current_a.exists()


def test_keep_last_keeps_the_most_recent_superseded_folders(tmp_path, env):
    project(tmp_path)
    for factor in (2, 3, 4):
        with_factor(tmp_path, factor)
        assert run(tmp_path, env)["b"] == ["running", "done"]
    by_factor = {f: folder_of(tmp_path, "b", "scaled.json", [x * f for x in range(5)]) for f in (2, 3, 4)}
    oldest = sum(files(by_factor[2]).values())

    removed = json_output("gc", arpipe("gc", "pipeline.yaml", "--keep-last", "1", "--yes", "--json", cwd=tmp_path,
                                       check=True).stdout)
    assert [(i["stage"], i["what"], i["path"], i["bytes"], i["state"]) for i in removed["items"]] == [
        ("b", "superseded", str(by_factor[2]), oldest, "removed")]
    assert removed["kept"] == [{"stage": "b", "path": str(by_factor[3]),
                                "reason": "one of the 1 most recent superseded (--keep-last)"}]
    assert removed["dry_run"] is False and removed["bytes"] == removed["freed"] == oldest
    assert [f for f, path in by_factor.items() if path.exists()] == [3, 4]

    second = sum(files(by_factor[3]).values())
    assert gc(tmp_path, "--yes")[0][:4] == ["b", "superseded", size(second), str(by_factor[3])]
    assert [f for f, path in by_factor.items() if path.exists()] == [4]
    bad = arpipe("gc", "pipeline.yaml", "--keep-last", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "arpipe: error: --keep-last -1: --keep-last must be 0 or more; give how many superseded folders of each "
        "stage to keep"]


def test_gc_on_s3_removes_the_superseded_output(tmp_path, env, s3_bucket):
    root = f"{s3_bucket}/runs"
    project(tmp_path, storage=root)
    env = {**env, "ARPIPE_STAGING": str(tmp_path / "staging")}
    run(tmp_path, env)
    storage = storage_for(root)
    before = {e.relpath: e.size for e in storage.list(root)}
    with_factor(tmp_path, 3)
    run(tmp_path, env)
    [scaled] = [rel for rel in before if rel.startswith("b/") and rel.endswith("scaled.json")]
    old_b = join(root, scaled.rsplit("/", 1)[0])
    old_files = {rel: n for rel, n in before.items() if rel.startswith(old_b[len(root) + 1:] + "/")}
    after_rerun = {e.relpath: e.size for e in storage.list(root)}

    listed = gc(tmp_path, env=env)
    assert listed == [["b", "superseded", size(sum(old_files.values())), old_b,
                       "superseded: config changed: config.factor 2 -> 3"],
                      [f"dry run: 1 item(s), {size(sum(old_files.values()))} would be freed; "
                       "rerun with --yes to remove them"]]
    assert gc(tmp_path, "--yes", env=env)[-1] == [f"removed 1 item(s), freed {size(sum(old_files.values()))}"]
    assert {e.relpath: e.size for e in storage.list(root)} == {
        rel: n for rel, n in after_rerun.items() if rel not in old_files}
    assert run(tmp_path, env) == {"a": ["cached"], "b": ["cached"]}


@pytest.mark.slow
def test_a_finished_train_stage_gives_back_its_checkpoints_an_unfinished_one_keeps_them(tmp_path, env):
    """One tiny train stage (2 steps, a checkpoint after each: Ray Train keeps both)."""
    from realdata import digits_folder
    from test_train_stage import DATA, train_block

    digits_folder(tmp_path / "data" / "digits", count=64)
    digits_folder(tmp_path / "data" / "heldout", count=16, start=1500)
    write(tmp_path, {"pipeline.yaml": DATA.format(name="gc-train").replace("max_samples: 200", "max_samples: 64")
                     + train_block("train", zero=0, workers=1, steps=2, every=1)})
    run(tmp_path, env)
    [train] = [p.parent for p in tmp_path.glob("runs/train/*/outputs.json")]
    ray_run = train / ".arpipe" / "ray" / "train"
    assert len([p for p in ray_run.glob("checkpoint_*") if p.is_dir()]) == 2
    held = sum(files(ray_run).values())
    before = files(tmp_path / "runs")

    # not finished (no commit): the checkpoints are its resume point
    (train / "outputs.json").rename(train / "outputs.json.aside")
    assert gc(tmp_path) == [["nothing to remove"]]
    (train / "outputs.json.aside").rename(train / "outputs.json")

    listed = gc(tmp_path)
    assert listed == [["train", "checkpoints", size(held), str(ray_run),
                       "checkpoints of a finished stage (its outputs are committed)"],
                      [f"dry run: 1 item(s), {size(held)} would be freed; rerun with --yes to remove them"]]
    assert gc(tmp_path, "--yes")[-1] == [f"removed 1 item(s), freed {size(held)}"]
    gone = ray_run.relative_to(tmp_path / "runs").as_posix() + "/"
    assert files(tmp_path / "runs") == {rel: n for rel, n in before.items() if not rel.startswith(gone)}
    assert (train / "model" / "model.safetensors").exists()
    assert all(states == ["cached"] for states in run(tmp_path, env).values())
