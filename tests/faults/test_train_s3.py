"""A train stage whose storage is S3 meets an outage and then a frozen server while it writes checkpoints.

With ``storage: s3://...`` Ray Train's checkpoints go straight to the bucket (pyarrow's S3 filesystem,
under the stage folder's ``.arpipe/ray/train/``), so both faults strike the path the checkpoints are
written through. One project meets both in turn: the server is stopped for 4 s while a checkpoint is
written (the run rides it out or stops with one clear line, and the user's rerun resumes), then frozen
while a later checkpoint is written, and the run is killed. Each run after a fault resumes from the
newest *complete* committed checkpoint — each one is downloaded and checked here against its markers —
and never from a partial one; the finished stage is then cached. The two faults count separately.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import pytest

from faults.harness import LiveRun, plan_rows
from faults.tally import TALLY
from faults.test_outages import one_clear_line, s3_keys

EVERY = 2
#: the two faults, in the order they strike; each is counted in the fault tally under its name
FAULTS = {"stopped": "S3 server stopped 4 s mid-checkpoint (train)",
          "frozen": "S3 server frozen mid-checkpoint, run killed (train)"}
PIPELINE = """
name: s3train
storage: {storage}
stages:
  train:
    kind: train
    data: [{{store: "{store}"}}]
    model: {{preset: tiny, paradigm: next_scale, n_layer: 1, n_embd: 32, n_head: 2}}
    optimizer: {{lr: 0.003, warmup_steps: 2}}
    deepspeed: {{zero_stage: 1}}
    workers: 1
    global_batch: 8
    steps: 16
    checkpoint_every: {every}
"""
SNAPSHOT = "/.arpipe/ray/train/checkpoint_manager_snapshot.json"
#: a line Ray relays from an actor's or worker's log: "(TrainController pid=123) ...", maybe coloured
RAY_LOG = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


class Bucket:
    """The train stage's checkpoints as the bucket holds them, read with boto3 beside the run."""

    def __init__(self, server, uri: str):
        self.server, self.name = server, uri[len("s3://"):]

    def snapshot_key(self) -> str | None:
        return next((k for k in s3_keys(self.server, self.name, "runs/train/") if k.endswith(SNAPSHOT)), None)

    def committed(self) -> list[tuple[int, str]]:
        """(step, key prefix) of each checkpoint Ray Train committed, oldest first ([] while unreadable)."""
        try:
            key = self.snapshot_key()
            if key is None:
                return []
            body = self.server._client().get_object(Bucket=self.name, Key=key)["Body"].read()
            results = json.loads(body)["checkpoint_results"]
        except Exception:   # the server is down or frozen, or the snapshot is being replaced
            return []
        experiment = key[: -len("/checkpoint_manager_snapshot.json")]
        return [(int(r["metrics"]["step"]), f"{experiment}/{r['checkpoint_dir_name']}/") for r in results]

    def damage(self, prefix: str) -> str | None:
        """The checkpoint under ``prefix`` downloaded and checked against its markers (None: whole)."""
        from arpipe.stages.train.checkpoints import damage

        client = self.server._client()
        with tempfile.TemporaryDirectory() as folder:
            for key in s3_keys(self.server, self.name, prefix):
                if key.endswith("/"):
                    continue
                local = Path(folder) / key[len(prefix):]
                local.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(self.name, key, str(local))
            return damage(Path(folder))

    def partial(self) -> list[str]:
        """Checkpoint folders in the bucket that Ray Train never committed (cut off mid-write)."""
        committed = {prefix for _step, prefix in self.committed()}
        folders = {k[: k.index("/", k.index("/checkpoint_")) + 1] for k in s3_keys(self.server, self.name, "runs/train/")
                   if "/checkpoint_" in k and not k.endswith(SNAPSHOT)}
        return sorted(folders - committed)


def resumed_steps(output: str) -> list[int]:
    return [int(s) for s in re.findall(r"\[train\] resumed at step (\d+)", output)]


def newest_step(bucket: Bucket) -> int:
    return max((step for step, _prefix in bucket.committed()), default=0)


def strike_during_a_checkpoint(bucket: Bucket, run: LiveRun, start_fault, after: int = 0) -> int | None:
    """Start the fault while a checkpoint newer than step ``after`` is being written: as soon as a
    checkpoint folder that is not yet committed shows in the bucket, or else right after the first
    commit past ``after`` (the next write, a step or two later, then runs into it). The newest committed
    step when it struck; None when the run ended first."""
    if not run.wait_until(lambda: newest_step(bucket) > after, timeout=240):
        return None
    struck_after = newest_step(bucket)
    deadline = time.time() + 5
    while time.time() < deadline and run.alive() and not bucket.partial():
        time.sleep(0.01)
    start_fault()
    return struck_after


def whole_steps(bucket: Bucket, label: str) -> list[int]:
    """The committed steps whose checkpoint is whole, each downloaded and checked; printed with the rest."""
    committed = bucket.committed()
    whole = [step for step, prefix in committed if bucket.damage(prefix) is None]
    print(f"{time.strftime('%X')} {label}: committed steps {[s for s, _ in committed]}, whole {whole}, "
          f"partial folders {len(bucket.partial())}")
    return whole


def resume_problems(output: str, whole: list[int], what: str) -> list[str]:
    """A run after a fault resumes at the newest whole committed step (and not at all when none is whole)."""
    steps = resumed_steps(output)
    expected = max(whole) if whole else None
    if expected is None and steps:
        return [f"{what}: no whole checkpoint, yet it resumed at step {steps[0]}"]
    if expected is not None and steps[:1] != [expected]:
        return [f"{what} resumed at {steps[:1] or 'no step'}; the last complete checkpoint is step {expected}: "
                f"{output[-1500:]}"]
    return []


def stopped_with_one_line(run: LiveRun, name: str) -> list[str]:
    """arpipe's own output ends in one line; what Ray relays from its actors' logs (prefixed with the actor,
    e.g. "(TrainController pid=...)", tracebacks included) is Ray's, reported beside it."""
    ours = "\n".join(line for line in run.output.splitlines() if not RAY_LOG.match(line))
    relayed = sum(1 for line in run.output.splitlines() if RAY_LOG.match(line) and "Traceback" in line)
    print(f"{name}: arpipe stopped with one line; Ray relayed {relayed} traceback(s) from its actors' logs")
    return [f"{what} in the stopped run's output:\n{ours[-3000:]}" for what in one_clear_line(ours, ours)]


# make test-full: the longest fault test (two outages of a training on S3); in make test the S3 outage mid-write
# (tests/faults/test_outages.py) and the checkpoint faults (tests/test_checkpoint_faults.py) cover its parts
@pytest.mark.full
def test_train_on_s3_resumes_from_the_last_complete_checkpoint_after_an_outage_then_a_freeze(
        tmp_path, fault_ray, prepared, s3_server, s3_bucket):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(PIPELINE.format(storage=f"{s3_bucket}/runs", store=prepared["store"],
                                                          every=EVERY))
    env = {"RAY_ADDRESS": fault_ray.address}
    bucket = Bucket(s3_server, s3_bucket)
    problems: dict[str, list[str]] = {fault: [] for fault in FAULTS}

    # 1. the server stops for 4 s while a checkpoint is written, then starts again
    run = LiveRun(folder, ["run", "pipeline.yaml"], env)
    stopped_after = strike_during_a_checkpoint(bucket, run, s3_server.stop)
    if stopped_after is None:
        problems["stopped"].append(f"the run ended before the server was stopped: {run.output[-2000:]}")
        stopped_after = 0
    else:
        time.sleep(4)
        s3_server.start()                 # the same server, same data, back on the same port

    # 2. the freeze strikes a later checkpoint of the same run, or (when it stopped) of the user's rerun
    frozen_after = strike_during_a_checkpoint(bucket, run, s3_server.pause, after=stopped_after)
    rerun_after_stop: list[int] | None = None   # the whole steps the user's rerun found, when there was one
    if frozen_after is None:              # the run stopped (or finished) without a later checkpoint
        code = run.finish(timeout=60)
        print(f"{FAULTS['stopped']}: first run exit {code}")
        if code == 0:
            problems["frozen"].append(f"the run finished before the server was frozen: {run.output[-2000:]}")
        else:
            problems["stopped"] += stopped_with_one_line(run, FAULTS["stopped"])
            rerun_after_stop = whole_steps(bucket, FAULTS["stopped"])
            run = LiveRun(folder, ["run", "pipeline.yaml"], env)
            frozen_after = strike_during_a_checkpoint(bucket, run, s3_server.pause,
                                                      after=max(rerun_after_stop, default=0))
            if frozen_after is None:
                problems["frozen"].append(f"the rerun ended before the server was frozen: {run.output[-2000:]}")
    if frozen_after is not None:
        which = "first run (it rode the outage out)" if rerun_after_stop is None else "rerun"
        print(f"{time.strftime('%X')} {FAULTS['frozen']}: struck after step {frozen_after} of the {which}")
        time.sleep(2)                     # the checkpoint upload hangs on the frozen server ...
        job = fault_ray.job_of(run.proc.pid)
        run.kill()                        # ... and the user gives up on the run
        deadline = time.time() + 60
        while job and fault_ray.processes("RayTrainWorker", job=job) and time.time() < deadline:
            time.sleep(0.2)
        if job and fault_ray.processes("RayTrainWorker", job=job):   # said if the last rerun then fails
            print(f"{FAULTS['frozen']}: the killed run's Ray Train worker still runs after 60 s")
    code = run.finish(timeout=60)
    s3_server.resume()
    if rerun_after_stop is not None:      # the stopped run's rerun (killed in its turn) resumed first
        problems["stopped"] += resume_problems(run.output, rerun_after_stop, "the rerun after the outage")
    print(f"{FAULTS['frozen']}: run exit {code}")

    # 3. the user's last run resumes from the newest whole checkpoint and finishes; the stage is then cached
    whole = whole_steps(bucket, FAULTS["frozen"])
    last = LiveRun(folder, ["run", "pipeline.yaml"], env)
    if last.finish(timeout=150) != 0:     # ~50 s undisturbed; a hang is reported with its output
        for fault in FAULTS:
            problems[fault].append(f"the last rerun failed: {last.output[-3000:]}")
    problems["frozen"] += resume_problems(last.output, whole, "the rerun after the freeze")
    if plan_rows(folder, "pipeline.yaml")["train"][2] != "cached":
        for fault in FAULTS:
            problems[fault].append("the finished train stage is not cached")
    for fault, name in FAULTS.items():
        TALLY.fault(name, survived=not problems[fault])
    assert not any(problems.values()), problems
