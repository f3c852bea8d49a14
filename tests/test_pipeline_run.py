"""A user's story with three `python` stages (a -> b, a -> c): run, rerun, change, force, kill, lineage."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import arpipe, json_output, spawn, stage_lines, write

STEPS = """
import json, os, time

def make(config, inputs, out_dir):
    path = os.path.join(out_dir, "numbers.json")
    with open(path, "w") as f:
        json.dump(list(range(config["n"])), f)
    return {"numbers": path, "count": config["n"]}

def scale(config, inputs, out_dir):
    numbers = json.load(open(inputs["numbers"]))
    done = os.path.join(out_dir, "partial.txt")
    resumed = os.path.exists(done)
    with open(done, "a") as f:
        f.write("started\\n")
    pause = os.environ.get("ARPIPE_TEST_PAUSE")
    if pause and os.path.exists(pause):
        time.sleep(60)
    result = os.path.join(out_dir, "scaled.json")
    with open(result, "w") as f:
        json.dump([x * config["factor"] for x in numbers], f)
    return {"scaled": result, "resumed": resumed}

def boom(config, inputs, out_dir):
    raise ValueError("the data is bad")
"""

SUMMARY = """
import json

def total(config, inputs, out_dir):
    return {"total": sum(json.load(open(inputs["numbers"])))}
"""

PIPELINE = """
name: story
storage: ./runs
stages:
  a:
    kind: python
    callable: steps:make
    config: {n: 5}
  b:
    kind: python
    callable: steps:scale
    inputs: {numbers: "${a.numbers}"}
    config: {factor: 2, api_token: "tok-123456"}
  c:
    kind: python
    callable: summary:total
    inputs: {numbers: "${a.numbers}"}
"""


def start_with_b_paused(folder, env):
    """`arpipe run` in the background, returned once stage b has started (b then sleeps)."""
    pause = folder / "pause-b"
    pause.write_text("1")
    env = {**env, "ARPIPE_TEST_PAUSE": str(pause)}
    # started as from a terminal, where Ctrl-C raises KeyboardInterrupt: a suite started in the background
    # (`make test &`, some CI runners) has SIGINT ignored, children inherit that, and Python then keeps it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = spawn("run", "pipeline.yaml", cwd=folder, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 120
    while not list(folder.glob("runs/b/*/partial.txt")):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    return proc, pause, env


@pytest.fixture
def project(tmp_path, ray_cluster):
    write(tmp_path, {"steps.py": STEPS, "summary.py": SUMMARY, "pipeline.yaml": PIPELINE})
    env = {"RAY_ADDRESS": ray_cluster}
    return tmp_path, env


def test_run_rerun_change_and_force(project):
    folder, env = project
    first = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    assert stage_lines(first.stdout) == {"a": ["running", "done"], "b": ["running", "done"],
                                         "c": ["running", "done"]}
    outputs = sorted(folder.glob("runs/b/*/scaled.json"))
    assert len(outputs) == 1 and json.loads(outputs[0].read_text()) == [0, 2, 4, 6, 8]

    again = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    assert stage_lines(again.stdout) == {"a": ["cached"], "b": ["cached"], "c": ["cached"]}
    assert "stages run on Ray" not in again.stdout   # nothing to run: Ray is not even started

    plan = arpipe("plan", "pipeline.yaml", "-s", "stages.b.config.factor=3", cwd=folder, check=True)
    rows = {line.split()[0]: line for line in plan.stdout.splitlines()[1:]}
    assert " cached " in rows["a"] and " cached " in rows["c"]
    assert " run " in rows["b"] and "config changed: config.factor 2 -> 3" in rows["b"]

    changed = arpipe("run", "pipeline.yaml", "-s", "stages.b.config.factor=3", cwd=folder, env=env, check=True)
    assert stage_lines(changed.stdout) == {"a": ["cached"], "b": ["running", "done"], "c": ["cached"]}

    forced = arpipe("run", "pipeline.yaml", "--force", "a", cwd=folder, env=env, check=True)
    assert stage_lines(forced.stdout) == {"a": ["running", "done"], "b": ["running", "done"],
                                          "c": ["running", "done"]}

    status = arpipe("status", "pipeline.yaml", cwd=folder, check=True)
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert [lines[s][1] for s in "abc"] == ["done", "done", "done"]
    as_json = json_output("status", arpipe("status", "pipeline.yaml", "--json", cwd=folder, check=True).stdout)
    rows = {row["stage"]: row for row in as_json["stages"]}
    assert [rows[s]["state"] for s in "abc"] == ["done", "done", "done"]
    assert [(rows[s]["fingerprint"][:12], rows[s]["mlflow_run_id"] or "-") for s in "abc"] == \
        [(lines[s][2], lines[s][5]) for s in "abc"], (status.stdout, as_json)
    assert all(rows[s]["duration_s"] >= 0 for s in "abc")


def test_editing_the_callable_reruns_its_stages(project):
    folder, env = project
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    summary = folder / "summary.py"
    summary.write_text(summary.read_text().replace('{"total": sum(', '{"total": 10 + sum('))
    plan = arpipe("plan", "pipeline.yaml", cwd=folder, check=True)
    rows = {line.split()[0]: line.split(None, 4) for line in plan.stdout.splitlines()[1:]}
    assert rows["a"][2] == "cached" and rows["b"][2] == "cached"
    assert rows["c"][2] == "run" and rows["c"][4] == "code changed"
    run = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    assert stage_lines(run.stdout) == {"a": ["cached"], "b": ["cached"], "c": ["running", "done"]}
    totals = [json.loads(p.read_text())["outputs"]["total"]["value"] for p in folder.glob("runs/c/*/outputs.json")]
    assert sorted(totals) == [10, 20]


def test_lineage_in_mlflow(project):
    folder, env = project
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("story")
    # the all-cached rerun returned before its lineage was written (a background writer): a user
    # opening MLflow sees it within seconds
    deadline = time.time() + 10
    while True:
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        finished = [p for p in parents if p.info.status == "FINISHED"]
        if len(finished) == 2 or time.time() > deadline:
            break
        time.sleep(0.25)
    assert len(parents) == 2
    first, second = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    assert sorted(r.data.tags["arpipe.stage"] for r in children) == ["a", "b", "c"]
    by_stage = {r.data.tags["arpipe.stage"]: r for r in children}
    for stage, run in by_stage.items():
        record = json.loads(next(folder.glob(f"runs/{stage}/*/outputs.json")).read_text())
        assert run.data.tags["arpipe.fingerprint"] == record["fingerprint"]
        assert run.data.tags["arpipe.kind"] == "python"
        assert run.info.status == "FINISHED"
    b = by_stage["b"]
    assert b.data.params["config.api_token"] == "***"
    assert b.data.params["config.factor"] == "2"
    a_record = json.loads(next(folder.glob("runs/a/*/outputs.json")).read_text())
    [dataset_input] = b.inputs.dataset_inputs
    assert dataset_input.dataset.name == "a.numbers"
    assert a_record["outputs"]["numbers"]["digest"].startswith(dataset_input.dataset.digest)
    assert json.loads(dataset_input.dataset.profile)["digest"] == a_record["outputs"]["numbers"]["digest"]
    assert b.data.tags["arpipe.upstream_run_ids"] == by_stage["a"].info.run_id

    cached_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second.info.run_id]
    assert {r.data.tags["arpipe.cache"] for r in cached_children} == {"hit"}
    hits = {r.data.tags["arpipe.stage"]: r for r in cached_children}
    assert hits["b"].data.tags["arpipe.producer_run_id"] == b.info.run_id
    artifacts = [f.path for f in client.list_artifacts(first.info.run_id)]
    assert "pipeline.yaml" in artifacts
    text = Path(client.download_artifacts(first.info.run_id, "pipeline.yaml")).read_text()
    assert "tok-123456" not in text and "***" in text


def test_kill_9_while_b_runs_then_resume(project):
    folder, env = project
    proc, pause, env = start_with_b_paused(folder, env)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    b_dir = next(folder.glob("runs/b/*/partial.txt")).parent
    assert not (b_dir / "outputs.json").exists()

    plan = arpipe("plan", "pipeline.yaml", cwd=folder, check=True)
    rows = {line.split()[0]: line.split() for line in plan.stdout.splitlines()[1:]}
    assert rows["a"][2] == "cached" and rows["b"][2] == "resume"

    pause.unlink()
    rerun = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    states = stage_lines(rerun.stdout)
    assert states["a"] == ["cached"] and states["b"] == ["resuming", "done"] and states["c"][-1] in ("done", "cached")
    record = json.loads((b_dir / "outputs.json").read_text())
    assert record["outputs"]["resumed"]["value"] is True
    assert json.loads((b_dir / "scaled.json").read_text()) == [0, 2, 4, 6, 8]


def test_failed_stage_does_not_stop_independent_branch(project):
    folder, env = project
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text().replace("callable: steps:scale", "callable: steps:boom") + """
  d:
    kind: python
    callable: summary:total
    inputs: {numbers: "${b.scaled}"}
""")
    run = arpipe("run", "pipeline.yaml", cwd=folder, env=env)
    assert run.returncode == 1
    states = stage_lines(run.stdout)
    assert states["b"][-1] == "failed" and states["c"][-1] == "done" and states["d"] == ["skipped"]
    assert "stage(s) failed: b: ValueError: the data is bad" in run.stderr
    assert "Traceback" not in run.stderr
    status = arpipe("status", "pipeline.yaml", cwd=folder, check=True)
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert lines["b"][1] == "failed" and lines["c"][1] == "done" and lines["d"][1] == "pending"


def test_two_concurrent_runs_never_write_the_same_output(project):
    folder, env = project
    first, pause, env = start_with_b_paused(folder, env)
    second = spawn("run", "pipeline.yaml", cwd=folder, env=env)
    deadline = time.time() + 60
    seen = ""
    while "waiting" not in seen:
        line = second.stdout.readline()
        assert line and time.time() < deadline, seen
        seen += line
    assert "b" in seen.split("waiting")[0].splitlines()[-1]
    pause.unlink()
    # the first run's b sleeps on; kill it: its lock turns stale and the second run takes over
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    out, _ = second.communicate(timeout=180)
    assert second.returncode == 0, seen + out
    states = stage_lines(seen + out)
    assert states["b"][0] == "waiting" and states["b"][-1] == "done"
    b_dir = next(folder.glob("runs/b/*/partial.txt")).parent
    assert (b_dir / "partial.txt").read_text().count("started") == 2


def test_ctrl_c_stops_cleanly_and_leaves_resumable_work(project):
    folder, env = project
    proc, pause, env = start_with_b_paused(folder, env)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    b_dir = next(folder.glob("runs/b/*/partial.txt")).parent
    assert not (b_dir / "outputs.json").exists() and not (b_dir / ".arpipe" / "lock").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("story").experiment_id])
    b_run = next(r for r in runs if r.data.tags.get("arpipe.stage") == "b")
    assert b_run.info.status == "KILLED"

    pause.unlink()
    rerun = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    assert stage_lines(rerun.stdout)["b"] == ["resuming", "done"]
