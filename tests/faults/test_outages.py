"""Faults from outside arpipe: the S3 server stops mid-write, the disk fills up, runs start together.

Each run must either ride the fault out or stop with one clear line; what it left is never
trusted, a rerun resumes it, and the result equals an undisturbed run's.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import arpipe, write
from s3server import ACCESS_KEY, SECRET_KEY

from faults.harness import LiveRun, committed, leaks, plan_rows
from faults.tally import TALLY

PIPELINE = """
name: outage
storage: {storage}
stages:
  encode:
    kind: tokenize
    source: {{modality: image, uri: "{digits}", channels: 1, size: 8, files_per_unit: 2}}
    tokenizer: "{tokenizer}"
    shards: {{samples_per_shard: 64}}
    workers: 1
"""


def pipeline(folder: Path, storage: str, prepared: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(PIPELINE.format(storage=storage, **prepared))
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fault_ray, prepared) -> dict:
    """The store an undisturbed run writes (local storage): the manifest every faulted run must match."""
    folder = pipeline(tmp_path_factory.mktemp("reference"), "./runs", prepared)
    arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": fault_ray.address}, check=True)
    return json.loads(next(folder.glob("runs/encode/*/store/manifest.json")).read_text())


def one_clear_line(proc_output: str, stderr: str) -> list[str]:
    problems = []
    if "Traceback" in proc_output + stderr:
        problems.append("a traceback")
    errors = [line for line in stderr.splitlines() if line.startswith("arpipe:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines: {errors}")
    return problems


# --------------------------------------------------------------------------------------------- S3


S3_SECRETS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


def s3_keys(server, bucket: str, prefix: str) -> list[str]:
    client = server._client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def test_s3_server_stopped_mid_write_then_started_again(tmp_path, fault_ray, prepared, reference,
                                                       s3_server, s3_bucket):
    bucket = s3_bucket[len("s3://"):]
    folder = pipeline(tmp_path, f"{s3_bucket}/runs", prepared)
    env = {"RAY_ADDRESS": fault_ray.address}

    def units() -> int:
        return sum(1 for k in s3_keys(s3_server, bucket, "runs/encode/") if "/.arpipe/units/" in k)

    def stop() -> None:
        s3_server.stop()              # connections refused ...
        time.sleep(3)
        s3_server.start()             # ... then the same server, same data, back on the same port

    def freeze() -> None:
        s3_server.pause()             # a server that hangs instead: requests stall, no error
        time.sleep(3)
        s3_server.resume()

    # each fault strikes 10 units into a run; a run may ride it out or stop with one line, and
    # the next run (a user's rerun) must resume, until both struck and a run finished
    pending = [("S3 server stopped 3 s mid-write", stop), ("S3 server frozen 3 s mid-write", freeze)]
    faults, problems, code, output = [], [], 1, ""
    for _attempt in range(4):
        run = LiveRun(folder, ["run", "pipeline.yaml"], env)
        while pending:
            start = units()
            if not run.wait_until(lambda start=start: units() >= start + 10, timeout=180):
                break
            name, strike = pending.pop(0)
            strike()
            faults.append(name)
        code = run.finish(timeout=300)
        output = run.output
        if code == 0:
            break
        problems += one_clear_line(output, output)
    problems += [f"not injected before the store was done: {name}" for name, _strike in pending]
    if code != 0:
        problems.append(f"the run did not finish: {output[-2000:]}")
    else:
        rows = plan_rows(folder, "pipeline.yaml")
        if rows["encode"][2] != "cached":
            problems.append(f"plan after the run: {rows['encode']}")
        keys = s3_keys(s3_server, bucket, "runs/encode/")
        manifest_key = next(k for k in keys if k.endswith("/store/manifest.json"))
        client = s3_server._client()
        manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
        if manifest["digest"] != reference["digest"]:
            problems.append(f"store digest {manifest['digest']} != undisturbed {reference['digest']}")
        verify = arpipe("store", "verify", f"s3://{bucket}/{manifest_key.rsplit('/', 1)[0]}", cwd=folder)
        if verify.returncode != 0:
            problems.append(f"store verify: {verify.stdout[-1000:]} {verify.stderr}")
        # the S3 credentials the run used are in no object it wrote (outputs.json, manifests, ledger,
        # unit records, lock) nor in MLflow or its output
        written = {key: client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
                   for key in s3_keys(s3_server, bucket, "") if key.endswith(".json")}
        found = leaks(S3_SECRETS, {**written, "output": output}, [folder])
        TALLY.leaks(len(found))
        problems += [f"credential leaked: {where}" for where in found]
    for fault in faults:
        TALLY.fault(fault, survived=not problems)
    assert not problems, problems


# --------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as in CI's container); grown later with ``grow()``."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {made.stderr.decode().strip()}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)

    yield mount, grow
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_with_one_line_then_resumes(tmp_path, fault_ray, prepared, reference, small_disk):
    disk, grow = small_disk
    folder = pipeline(tmp_path / "project", str(disk / "runs"), prepared)
    env = {"RAY_ADDRESS": fault_ray.address}
    full = arpipe("run", "pipeline.yaml", cwd=folder, env=env)
    problems = []
    if full.returncode == 0:
        problems.append("the run finished on a 1 MiB disk: the fault was not injected")
    problems += one_clear_line(full.stdout, full.stderr)
    if "No space left on device" not in full.stderr:
        problems.append(f"the error does not say the disk is full: {full.stderr.strip()}")
    out = next((disk / "runs" / "encode").glob("*"), None)
    if out is not None and committed(out) is None:
        problems.append("a stage committed on a full disk")
    if plan_rows(folder, "pipeline.yaml")["encode"][2] == "cached":
        problems.append("plan trusts the stage that failed on a full disk")
    done_before = len(list(out.glob(".arpipe/units/u*.json"))) if out is not None else 0

    grow()
    rerun = arpipe("run", "pipeline.yaml", cwd=folder, env=env)
    if rerun.returncode != 0:
        problems.append(f"the rerun on a grown disk failed: {rerun.stderr.strip()}")
    else:
        match = re.search(r"(\d+) reused", rerun.stdout)
        reused = int(match.group(1)) if match else -1
        if done_before and reused < done_before:
            problems.append(f"the rerun reused {reused} units of the {done_before} committed before the disk filled")
        manifest = json.loads(next((disk / "runs").glob("encode/*/store/manifest.json")).read_text())
        if manifest["digest"] != reference["digest"]:
            problems.append("the resumed store differs from an undisturbed run's")
    TALLY.fault("disk full mid-write", survived=not problems)
    assert not problems, f"{problems}\n--- first run:\n{full.stdout[-2000:]}\n{full.stderr}"


# ------------------------------------------------------------------------------- runs started together

STEPS = """
def make(config, inputs, out_dir):
    return {"n": config["n"]}
"""


def test_runs_started_together_on_a_fresh_folder_all_succeed(tmp_path, fault_ray):
    """A fresh SQLite tracking file is created by the first run; three starting at once must not break it."""
    write(tmp_path, {"steps.py": STEPS, "pipeline.yaml": """
        name: together
        storage: ./runs
        stages:
          a: {kind: python, callable: "steps:make", config: {n: 1}, resources: {num_cpus: 0}}
        """})
    runs = [LiveRun(tmp_path, ["run", "pipeline.yaml", "-s", f"storage=./runs{i}"], {"RAY_ADDRESS": fault_ray.address})
            for i in range(3)]
    codes = [run.finish(timeout=240) for run in runs]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("together")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags] \
        if experiment else []
    TALLY.fault("runs started together on a fresh MLflow database", survived=codes == [0, 0, 0] and len(parents) == 3)
    assert codes == [0, 0, 0], "\n\n".join(run.output[-1500:] for run in runs)
    assert len(parents) == 3
