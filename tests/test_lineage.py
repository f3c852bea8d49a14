"""Lineage from one writer: a python stage's own `mlflow.log_metric`, and cached reruns delivered after the fact.

A user's story: a pipeline of three python stages runs, its callable logs a metric with plain
MLflow calls, and a rerun that finds everything cached returns before MLflow has its lineage. That
lineage must arrive within 10 s, survive a writer that dies before delivering it (the next command
delivers it), and never arrive twice.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pytest
from helpers import arpipe, stage_lines, write

STEPS = """
import json, os

def make(config, inputs, out_dir):
    import mlflow

    mlflow.log_metric("rows", float(config["n"]))      # plain MLflow, as a user writes it
    mlflow.set_tag("made_by", "make")
    path = os.path.join(out_dir, "numbers.json")
    with open(path, "w") as f:
        json.dump(list(range(config["n"])), f)
    return {"numbers": path}

def total(config, inputs, out_dir):
    return {"total": sum(json.load(open(inputs["numbers"])))}
"""

PIPELINE = """
name: lineage-story
storage: ./runs
stages:
  make: {kind: python, callable: "steps:make", config: {n: 4}}
  total: {kind: python, callable: "steps:total", inputs: {numbers: "${make.numbers}"}}
  again: {kind: python, callable: "steps:total", inputs: {numbers: "${make.numbers}"}, config: {copy: 2}}
"""


@pytest.fixture
def project(tmp_path, ray_cluster):
    write(tmp_path, {"steps.py": STEPS, "pipeline.yaml": PIPELINE})
    return tmp_path, {"RAY_ADDRESS": ray_cluster}


def client_for(folder: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def parents_and_children(folder: Path) -> tuple[list, dict[str, dict[str, object]]]:
    client = client_for(folder)
    experiment = client.get_experiment_by_name("lineage-story")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: {r.data.tags["arpipe.stage"]: r for r in runs
                                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id} for p in parents}
    return parents, children


def wait_for_parents(folder: Path, count: int, within: float = 10.0) -> tuple[list, dict]:
    """Poll MLflow until ``count`` finished parent runs are there, each with its three stage runs, and no
    lineage record is pending (the writer removes a record once MLflow holds all of it, a moment after)."""
    deadline = time.time() + within
    while True:
        parents, children = parents_and_children(folder)
        done = [p for p in parents if p.info.status == "FINISHED" and len(children[p.info.run_id]) == 3]
        if (len(done) >= count and not pending_records(folder)) or time.time() > deadline:
            return parents, children
        time.sleep(0.25)


def pending_records(folder: Path) -> list[Path]:
    return sorted((folder / "runs" / ".arpipe" / "lineage" / "pending").glob("*.json"))


def kill_writers(folder: Path) -> int:
    """SIGKILL the background lineage writers this test's runs started (matched by their storage folder)."""
    killed = 0
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "arpipe.pipeline.lineage_queue" in cmdline and str(folder / "runs") in cmdline:
            try:
                proc.kill()
                killed += 1
            except psutil.NoSuchProcess:
                pass
    return killed


def test_user_code_logs_into_its_stage_run(project):
    folder, env = project
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    parents, children = parents_and_children(folder)
    [parent] = parents
    make = children[parent.info.run_id]["make"]
    assert make.data.metrics["rows"] == 4.0
    assert make.data.tags["made_by"] == "make"
    assert make.info.status == "FINISHED"
    # no stray run: nothing beside the pipeline's parent and its three stages, in any experiment
    client = client_for(folder)
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(everything) == 4
    assert "rows" not in children[parent.info.run_id]["total"].data.metrics


def test_cached_rerun_lineage_arrives_within_seconds(project):
    folder, env = project
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    rerun = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    returned = time.time()
    assert stage_lines(rerun.stdout) == {"make": ["cached"], "total": ["cached"], "again": ["cached"]}
    parents, children = wait_for_parents(folder, 2)
    assert time.time() - returned < 10.5, "the cached run's lineage took longer than 10 s"
    assert len(parents) == 2
    first, second = parents
    hits = children[second.info.run_id]
    assert {r.data.tags["arpipe.cache"] for r in hits.values()} == {"hit"}
    assert hits["make"].data.tags["arpipe.producer_run_id"] == children[first.info.run_id]["make"].info.run_id
    record = json.loads(next(folder.glob("runs/total/*/outputs.json")).read_text())
    assert hits["total"].data.tags["arpipe.fingerprint"] == record["fingerprint"]
    [dataset_input] = hits["total"].inputs.dataset_inputs
    assert dataset_input.dataset.name == "make.numbers"
    assert hits["again"].data.params["config.copy"] == "2"
    # the runs carry the times the run had, not the time of delivery
    assert second.info.start_time <= returned * 1000 and second.info.end_time <= returned * 1000
    assert pending_records(folder) == []
    status = arpipe("status", "pipeline.yaml", cwd=folder, check=True)
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert rows["total"][1] == "cached" and hits["total"].info.run_id in rows["total"]


def test_a_writer_killed_before_delivery_loses_nothing_and_delivers_once(project):
    folder, env = project
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    killed = kill_writers(folder)          # MLflow alone takes the writer over a second to import
    [record] = pending_records(folder)
    assert killed == 1
    time.sleep(1.0)
    parents, _ = parents_and_children(folder)
    assert len(parents) == 1               # the cached run is not in MLflow yet ...
    kept = folder / "record.json"
    shutil.copy(record, kept)

    arpipe("status", "pipeline.yaml", cwd=folder, check=True)   # ... the next command delivers it
    parents, children = wait_for_parents(folder, 2)
    assert len(parents) == 2 and pending_records(folder) == []
    delivered = parents[1]
    assert {r.data.tags["arpipe.cache"] for r in children[delivered.info.run_id].values()} == {"hit"}

    # the same record once more (a writer that died after MLflow had it, before it said so): no second parent
    shutil.copy(kept, record)
    from arpipe.pipeline.lineage_queue import deliver_pending

    again = deliver_pending(str(folder / "runs"))
    assert list(again.values())[0][""] == delivered.info.run_id
    parents, children = parents_and_children(folder)
    assert len(parents) == 2 and len(children[delivered.info.run_id]) == 3


def test_inside_a_ray_job_a_cached_run_writes_its_lineage_before_it_returns(project):
    folder, env = project
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    # what Ray Jobs sets in a job's entrypoint: the job's end may take a background writer with it
    rerun = arpipe("run", "pipeline.yaml", cwd=folder, env={**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, check=True)
    parents, children = parents_and_children(folder)
    assert len(parents) == 2 and len(children[parents[1].info.run_id]) == 3
    assert f"MLflow run {parents[1].info.run_id} in experiment 'lineage-story'" in rerun.stdout
    ledger = json.loads((folder / "runs" / ".arpipe" / "ledger" / "lineage-story.json").read_text())
    assert ledger["mlflow_parent_run_id"] == parents[1].info.run_id


def test_a_new_projects_tracking_file_is_a_copy_of_a_migrated_one(tmp_path, monkeypatch):
    """The first project builds MLflow's tables once (into the cache); the next starts from a copy, and MLflow
    opens it as its own: the Default experiment at that project's artifact location, runs logged as usual."""
    from mlflow.tracking import MlflowClient

    from arpipe.pipeline.lineage import Lineage

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = tmp_path / "first", tmp_path / "second"
    for project in (first, second):
        project.mkdir()
        monkeypatch.chdir(project)
        started = time.perf_counter()
        lineage = Lineage(f"sqlite:///{project / 'mlflow.db'}", "story")
        seconds = time.perf_counter() - started
        run = lineage.start_parent("story", "stages: {}\n", {})
        lineage.client.log_metric(run, "rows", 3.0)
    print(f"\nnew tracking file: {seconds:.2f} s from the cached template")
    assert [p.name for p in (tmp_path / "cache" / "arpipe").iterdir()] == [
        f"mlflow-{__import__('mlflow').__version__}-empty.db"]
    client = MlflowClient(f"sqlite:///{second / 'mlflow.db'}")
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == str(second / "mlruns" / "0")
    [story] = client.search_runs([client.get_experiment_by_name("story").experiment_id])
    assert story.data.metrics == {"rows": 3.0}


DEFERRED = r"""
import pickle, sys
from pathlib import Path

from arpipe.pipeline.lineage import DeferredRunLog

folder = Path(sys.argv[1])
log = DeferredRunLog("the-stage-run")
log.log_metrics({"psnr": 31.5})
for step in (1, 2, 3):
    log.buffer_metrics({"fit_loss": 1.0 / step}, step)
log.flush()
log.set_tag("arpipe.skipped_metrics", "image/fid: no features.image")
(folder / "fit_report.json").write_text('{"codes": 64}')
log.log_artifact(folder / "fit_report.json", "reports")
log.log_table({"step": [1, 2], "loss": [0.5, 0.25]}, "curve.json")
assert log.metric_history("fit_loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
assert "mlflow" not in sys.modules, "the task opened MLflow"
sys.stdout.buffer.write(pickle.dumps(log.record))
"""


def test_what_a_stage_on_a_ray_task_logs_reaches_its_run_through_the_driver(tmp_path):
    """A stage placed on a Ray task (a tokenizer's fit, evaluate) never opens MLflow: importing it and opening the
    store cost each new worker ~3 s of CPU. What it logs goes back (pickled, as Ray carries it) with its outputs,
    and the driver writes it to the stage's run: metrics with their steps, tags, artifacts, tables."""
    import pickle
    import subprocess
    import sys

    from arpipe.pipeline.lineage import Lineage

    task = subprocess.run([sys.executable, "-c", DEFERRED, str(tmp_path)], capture_output=True, timeout=120)
    assert task.returncode == 0, task.stderr.decode()
    record = pickle.loads(task.stdout)
    lineage = Lineage(f"sqlite:///{tmp_path / 'mlflow.db'}", "deferred")
    run_id = lineage.client.create_run(lineage.experiment_id).info.run_id
    lineage.write_log(run_id, record)

    client = lineage.client
    run = client.get_run(run_id)
    assert run.data.metrics == {"psnr": 31.5, "fit_loss": pytest.approx(1 / 3)}
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "fit_loss"), key=lambda m: m.step)] \
        == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert run.data.tags["arpipe.skipped_metrics"] == "image/fid: no features.image"
    assert Path(client.download_artifacts(run_id, "reports/fit_report.json")).read_text() == '{"codes": 64}'
    table = json.loads(Path(client.download_artifacts(run_id, "curve.json")).read_text())
    assert table["columns"] == ["step", "loss"] and table["data"] == [[1, 0.5], [2, 0.25]]


def test_ctrl_c_while_a_stage_run_is_written_takes_effect_after_the_write(tmp_path, capfd):
    """Ctrl-C that lands while arpipe writes a stage's run to MLflow stops it once the write is done: every run
    in the store is whole (all its parameters), and SQLAlchemy prints no traceback of a transaction cut short
    (a Ctrl-C test through `arpipe run` once failed on one). Ctrl-C lands before each of the write's calls to
    the tracking store in turn, as from a terminal (Python's default SIGINT handler)."""
    import os
    import signal

    from mlflow.tracking import MlflowClient

    from arpipe.pipeline.lineage import Lineage

    class Interrupting:
        """The tracking client, sending this process Ctrl-C just before its ``at``-th call."""

        def __init__(self, client):
            self.client, self.calls, self.at = client, 0, -1

        def __getattr__(self, name):
            method = getattr(self.client, name)
            if not callable(method):
                return method

            def call(*args, **kwargs):
                if self.calls == self.at:
                    os.kill(os.getpid(), signal.SIGINT)
                self.calls += 1
                return method(*args, **kwargs)
            return call

    config = {f"option_{i}": i for i in range(12)}
    lineage = Lineage(f"sqlite:///{tmp_path / 'mlflow.db'}", "ctrl-c")
    parent = lineage.start_parent("ctrl-c", "{}", {})
    lineage.client = client = Interrupting(lineage.client)

    def write_stage(name: str) -> None:
        lineage.start_stage(parent, name, "python", "f" * 16, config, [], {"arpipe.stage": name})

    write_stage("counted")
    calls = client.calls
    assert calls >= 2                  # a run is created, then its parameters logged: there is a middle
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupted = []
    try:
        for k in range(calls):
            client.calls, client.at = 0, k
            try:
                write_stage(f"s{k}")
            except KeyboardInterrupt:
                interrupted.append(k)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted == list(range(calls))          # Ctrl-C still stops arpipe
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [lineage.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    written = {r.data.tags.get("arpipe.stage") for r in runs}
    assert not [k for k in range(calls) if f"s{k}" not in written], f"writes cut off by Ctrl-C ({calls} calls)"
    half = [r.data.tags.get("arpipe.stage") for r in runs if len(r.data.params) < len(config)]
    assert not half, f"runs cut off half-written: {half}"
    assert "Traceback" not in capfd.readouterr().err
