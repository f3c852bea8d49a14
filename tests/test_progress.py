"""What a running stage tells its user: a progress line at least every 10 s with an ETA, metrics in MLflow no
older than 10 s, and the machine's system metrics in the train stage's run."""

from __future__ import annotations

import time

import pytest

from arpipe.pipeline.lineage import RunLog
from arpipe.pipeline.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_for_the_first_step_then_every_10_s_and_the_last_with_an_eta():
    clock, lines = Clock(), []
    progress = Progress("train", 100, clock=clock, echo=lines.append)
    printed = []
    for step in range(1, 101):
        clock.now += 0.5   # 0.5 s a step: 50 s in all
        printed.append(progress.update(step, loss=2.5, lr=3e-4, tokens_per_s=12345.6))
    shown = [step for step, line in zip(range(1, 101), printed, strict=True) if line]
    assert shown == [1, 21, 41, 61, 81, 100]   # the first, every 10 s of steps, the last
    assert lines[0] == "[train] step 1/100  loss 2.5  lr 0.0003  tokens_per_s 12346  elapsed 0 s, ETA 50 s"
    assert lines[2] == "[train] step 41/100  loss 2.5  lr 0.0003  tokens_per_s 12346  elapsed 20 s, ETA 30 s"
    assert lines[-1].endswith("elapsed 50 s, done")


def test_a_resumed_stage_estimates_from_the_steps_it_ran_itself():
    clock, lines = Clock(), []
    progress = Progress("train", 1000, start=900, clock=clock, echo=lines.append)
    clock.now += 10.0
    progress.update(910)
    assert lines == ["[train] step 910/1000  elapsed 10 s, ETA 1 min 30 s"]   # 1 s a step, 90 to go


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"),
                                                (7620, "2 h 07 min")])
def test_durations_read_like_a_clock(seconds, text):
    assert duration(seconds) == text


@pytest.fixture
def tracked_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("progress"))
    return uri, client, run.info.run_id


def test_buffered_metrics_reach_mlflow_within_10_s(tracked_run):
    uri, client, run_id = tracked_run
    log = RunLog(uri, run_id)
    log.buffer_metrics({"loss": 3.0}, 1)
    assert client.get_metric_history(run_id, "loss") == []   # a few values: kept
    log._flushed -= RunLog.FLUSH_EVERY_S   # 10 s later, the next value sends both
    log.buffer_metrics({"loss": 2.0}, 2)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0)]


def test_system_metrics_are_sampled_into_the_run(tracked_run, monkeypatch):
    uri, client, run_id = tracked_run
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    log = RunLog(uri, run_id)
    log.watch_system()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
        time.sleep(0.5)
    log.stop_watching()
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    RunLog(uri, None).watch_system()   # lineage off: nothing to watch, no error
