"""A train stage whose storage is S3 meets an outage and a frozen server while it writes a checkpoint.

With ``storage: s3://...`` Ray Train's checkpoints go straight to the bucket (pyarrow's S3 filesystem,
under the stage folder's ``.arpipe/ray/train/``), so both faults strike the path the checkpoints are
written through. The run may ride a fault out or stop with one clear line; either way the next run
resumes from the newest *complete* committed checkpoint — each one is downloaded and checked here
against its markers — and never from a partial one.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import pytest
from helpers import arpipe

from faults.harness import LiveRun, plan_rows
from faults.tally import TALLY
from faults.test_outages import one_clear_line, s3_keys

EVERY = 2
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


def strike_during_a_checkpoint(bucket: Bucket, run: LiveRun, start_fault) -> bool:
    """Start the fault while a checkpoint is being written: as soon as a checkpoint folder that is not yet
    committed shows in the bucket, or else right after the first commit (the next write, a step or two
    later, then runs into it). False when the run ended first."""
    if not run.wait_until(lambda: len(bucket.committed()) >= 1, timeout=240):
        return False
    deadline = time.time() + 5
    while time.time() < deadline and run.alive() and not bucket.partial():
        time.sleep(0.01)
    start_fault()
    return True


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
def test_train_on_s3_resumes_from_the_last_complete_checkpoint(fault, tmp_path, fault_ray, prepared, s3_server,
                                                               s3_bucket):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(PIPELINE.format(storage=f"{s3_bucket}/runs", store=prepared["store"],
                                                          every=EVERY))
    env = {"RAY_ADDRESS": fault_ray.address}
    bucket = Bucket(s3_server, s3_bucket)
    problems: list[str] = []
    run = LiveRun(folder, ["run", "pipeline.yaml"], env)
    if fault == "stopped":
        name = "S3 server stopped 4 s mid-checkpoint (train)"
        struck = strike_during_a_checkpoint(bucket, run, s3_server.stop)
        if struck:
            time.sleep(4)
            s3_server.start()             # the same server, same data, back on the same port
        code = run.finish(timeout=300)
    else:
        name = "S3 server frozen mid-checkpoint, run killed (train)"
        struck = strike_during_a_checkpoint(bucket, run, s3_server.pause)
        time.sleep(2)                     # the checkpoint upload hangs on the frozen server ...
        job = fault_ray.job_of(run.proc.pid)
        run.kill()                        # ... and the user gives up on the run
        code = run.finish(timeout=60)
        deadline = time.time() + 60
        while job and fault_ray.processes("RayTrainWorker", job=job) and time.time() < deadline:
            time.sleep(0.2)
        s3_server.resume()
    if not struck:
        problems.append(f"the run ended before the fault was injected: {run.output[-2000:]}")
    if code not in (0, -9) and fault == "stopped":
        # arpipe's own output ends in one line; what Ray relays from its actors' logs (prefixed with the
        # actor, e.g. "(TrainController pid=...)", tracebacks included) is Ray's, reported below
        ours = "\n".join(line for line in run.output.splitlines() if not RAY_LOG.match(line))
        problems += [f"{what} in the stopped run's output:\n{ours[-3000:]}" for what in one_clear_line(ours, ours)]
        relayed = sum(1 for line in run.output.splitlines() if RAY_LOG.match(line) and "Traceback" in line)
        print(f"{name}: arpipe stopped with one line; Ray relayed {relayed} traceback(s) from its actors' logs")

    # what the bucket holds now: the committed checkpoints, each downloaded and checked, and any partial one
    committed = bucket.committed()
    whole = [step for step, prefix in committed if bucket.damage(prefix) is None]
    partial = bucket.partial()
    print(f"{name}: first run exit {code}; committed steps {[s for s, _ in committed]}, whole {whole}, "
          f"partial folders {len(partial)}")
    if code != 0:   # stopped (or killed): the user's rerun resumes
        rerun = arpipe("run", "pipeline.yaml", cwd=folder, env=env, timeout=300)
        if rerun.returncode != 0:
            problems.append(f"the rerun failed: {rerun.stdout[-2000:]} {rerun.stderr[-1000:]}")
        steps = resumed_steps(rerun.stdout)
        expected = max(whole) if whole else None
        if expected is None and steps:
            problems.append(f"no whole checkpoint, yet the rerun resumed at step {steps[0]}")
        elif expected is not None and steps[:1] != [expected]:
            problems.append(f"the rerun resumed at {steps[:1] or 'no step'}; the last complete checkpoint is "
                            f"step {expected}: {rerun.stdout[-1500:]}")
    if not problems and plan_rows(folder, "pipeline.yaml")["train"][2] != "cached":
        problems.append("the finished train stage is not cached")
    TALLY.fault(name, survived=not problems)
    assert not problems, problems
