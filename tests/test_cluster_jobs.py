"""A user's story on a real Ray cluster: `arpipe submit`, stock `ray job submit`, `arpipe jobs`, token auth, S3.

Each head is a separate `ray start --head` on 127.0.0.1 with its own ports and
temp dir (the session's in-process Ray is untouched), one per auth mode for the
module, stopped by its processes' ids — never `ray stop`, which stops every Ray
on the machine. The cluster does not inherit the test's AWS_*/MLFLOW_* settings:
what a job needs reaches it through its runtime_env, as it must on a real cluster.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import arpipe, json_output, stage_lines, write

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

STEPS = """
import json, os, time

def make(config, inputs, out_dir):
    path = os.path.join(out_dir, "numbers.json")
    with open(path, "w") as f:
        json.dump(list(range(config["n"])), f)
    return {"numbers": path}

def total(config, inputs, out_dir):
    flag = config.get("fail_once_flag")
    if flag and not os.path.exists(flag):
        open(flag, "w").close()
        raise RuntimeError("fails on the first attempt, on purpose")
    time.sleep(config.get("sleep", 0))
    with open(inputs["numbers"]) as f:
        return {"total": sum(json.load(f))}
"""


def pipeline_yaml(name: str, storage: str, **total_config) -> str:
    return f"""
    name: {name}
    storage: {storage}
    stages:
      a:
        kind: python
        callable: steps:make
        config: {{n: 5}}
      b:
        kind: python
        callable: steps:total
        inputs: {{numbers: "${{a.numbers}}"}}
        config: {json.dumps(total_config)}
    """


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A one-node Ray cluster started with `ray start --head --block`, stopped by PID."""

    def __init__(self, auth_mode: str):
        self.auth_mode = auth_mode
        # short: Ray's unix sockets live below it and their paths are limited to ~107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="arpr"))
        self.token = secrets.token_hex(16) if auth_mode == "token" else None
        self.token_file = self.temp_dir / "auth_token"
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 90.0) -> RayHead:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_MODE"] = self.auth_mode
        if self.token:
            self.token_file.write_text(self.token)
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        workers = 20000 + 200 * random.randrange(50)       # below the ephemeral range, apart from other Rays
        command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--num-cpus=2",
                   "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                   f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
                   f"--object-manager-port={free_port()}", f"--min-worker-port={workers}",
                   f"--max-worker-port={workers + 199}"]
        log = open(self.temp_dir / "ray-start.log", "wb")
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.temp_dir / 'ray-start.log').read_text()[-2000:]}")
            if self._answers():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the Ray dashboard did not answer on {self.address} within {timeout:.0f} s")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.address}/api/version", timeout=2).read()
            return True
        except urllib.error.HTTPError as err:
            return err.code == 401           # token auth: up, and refusing us
        except OSError:
            return False

    def stop(self) -> None:
        import psutil

        procs: set[psutil.Process] = set()
        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                procs = {root, *root.children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):    # daemons that left the process tree
            try:
                if proc.pid != os.getpid() and any(marker in part for part in proc.info["cmdline"] or ()):
                    procs.add(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for proc in procs:        # a throwaway test cluster: nothing to shut down gracefully
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        if self.proc is not None:
            self.proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def open_head():
    head = RayHead("disabled").start()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def token_head():
    head = RayHead("token").start()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def module_tracking(tmp_path_factory) -> str:
    """One MLflow SQLite store for the module: creating its tables takes seconds, each test has its own experiment."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def story(tmp_path, module_tracking, request):
    """A project folder with the code, a storage folder, the tracking URI and this test's pipeline name."""
    project = write(tmp_path / "project", {"steps.py": STEPS})
    return project, module_tracking, tmp_path, request.node.name.replace("_", "-")


def submission_id(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted "))
    return line.split()[1]


def stock_ray_job_submit(head: RayHead, project: Path, env_vars: dict[str, str],
                         client_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """What a user without arpipe's help types: `ray job submit --working-dir . -- arpipe run pipeline.yaml`."""
    runtime_env = {"env_vars": env_vars, "excludes": ["mlflow.db", "/runs/"]}
    # Ray's CLI lets these override --address
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(client_env or {})
    return subprocess.run([RAY, "job", "submit", "--address", head.address, "--working-dir", str(project),
                           "--runtime-env-json", json.dumps(runtime_env), "--", "arpipe", "run", "pipeline.yaml"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=180)


def parents_and_children(tracking: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: {r.data.tags["arpipe.stage"]: r for r in runs
                                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id} for p in parents}
    return parents, children


def assert_one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_submit_then_stock_ray_job_submit_is_all_cached(open_head, story):
    project, tracking, tmp, name = story
    write(project, {"pipeline.yaml": pipeline_yaml(name, str(tmp / "runs"))})
    first = arpipe("submit", "pipeline.yaml", "--address", open_head.address, "--tracking-uri", tracking, "--wait",
                   cwd=project, timeout=180, check=True)
    job = submission_id(first.stdout)
    assert f"dashboard: {open_head.address}/#/jobs/{job}" in first.stdout
    assert f"{job} SUCCEEDED" in first.stdout
    parents, children = parents_and_children(tracking, name)
    [parent] = parents
    assert f"MLflow run {parent.info.run_id} in experiment '{name}'" in first.stdout
    assert sorted(children[parent.info.run_id]) == ["a", "b"]
    assert all(r.data.tags["arpipe.cache"] == "miss" for r in children[parent.info.run_id].values())
    record = json.loads(next((tmp / "runs").glob("b/*/outputs.json")).read_text())
    assert record["outputs"]["total"]["value"] == 10

    second = stock_ray_job_submit(open_head, project, {"MLFLOW_TRACKING_URI": tracking})
    assert second.returncode == 0, second.stdout + second.stderr
    assert stage_lines(second.stdout) == {"a": ["cached"], "b": ["cached"]}
    parents, children = parents_and_children(tracking, name)
    assert len(parents) == 2
    cached = children[parents[1].info.run_id]
    assert {s: r.data.tags["arpipe.cache"] for s, r in cached.items()} == {"a": "hit", "b": "hit"}
    first_b = children[parents[0].info.run_id]["b"]
    assert cached["b"].data.tags["arpipe.producer_run_id"] == first_b.info.run_id
    [dataset_input] = first_b.inputs.dataset_inputs
    assert dataset_input.dataset.name == "a.numbers"

    listed = arpipe("jobs", "list", "--address", open_head.address, cwd=project, check=True)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job))
    assert row.split()[1:3] == ["SUCCEEDED", name]
    status = arpipe("jobs", "status", job, "--address", open_head.address, cwd=project, check=True)
    assert f"{job}: SUCCEEDED" in status.stdout
    assert f"MLflow run {parent.info.run_id}" in status.stdout
    listed_json = json_output("jobs list", arpipe("jobs", "list", "--json", "--address", open_head.address,
                                                  cwd=project, check=True).stdout)
    mine = next(j for j in listed_json["jobs"] if j["submission_id"] == job)
    assert (mine["status"], mine["pipeline"], mine["file"]) == ("SUCCEEDED", name, "pipeline.yaml")
    assert mine["end_time"] >= mine["start_time"] > 0 and mine["dashboard_url"].endswith(job)
    one = json_output("jobs status", arpipe("jobs", "status", job, "--json", "--address", open_head.address,
                                            cwd=project, check=True).stdout)
    assert one["job"]["mlflow_run_id"] == parent.info.run_id and one["job"]["status"] == "SUCCEEDED"
    logs = arpipe("jobs", "logs", job, "--address", open_head.address, cwd=project, check=True)
    assert stage_lines(logs.stdout) == {"a": ["running", "done"], "b": ["running", "done"]}


@pytest.mark.full   # a retried job resuming on S3: the cache's resume is in make test (tests/test_pipeline_s3.py)
def test_s3_storage_a_retry_resumes_through_the_cache(open_head, story, s3_bucket, s3_env):
    project, tracking, tmp, name = story
    storage = f"{s3_bucket}/runs"
    write(project, {"pipeline.yaml": pipeline_yaml(name, storage, fail_once_flag=str(tmp / "failed-once"))})
    run = arpipe("submit", "pipeline.yaml", "--address", open_head.address, "--tracking-uri", tracking,
                 "--env", "AWS_*", "--retries", "1", cwd=project, timeout=240, check=True)
    first = submission_id(run.stdout)
    assert f"{first} FAILED; resubmitting" in run.stdout
    assert "last log lines:" in run.stdout and "fails on the first attempt, on purpose" in run.stdout
    assert f"{first}-retry1 SUCCEEDED" in run.stdout
    parents, children = parents_and_children(tracking, name)
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"]
    retried = children[parents[1].info.run_id]
    assert retried["a"].data.tags["arpipe.cache"] == "hit"       # a was not redone
    assert retried["b"].data.tags["arpipe.cache"] == "miss"

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/").get("Contents", [])]
    assert any(k.startswith("runs/a/") and k.endswith("/outputs.json") for k in keys), keys
    assert any(k.startswith("runs/b/") and k.endswith("/outputs.json") for k in keys), keys

    stock = stock_ray_job_submit(open_head, project, {"MLFLOW_TRACKING_URI": tracking, **s3_env})
    assert stock.returncode == 0, stock.stdout + stock.stderr
    assert stage_lines(stock.stdout) == {"a": ["cached"], "b": ["cached"]}
    parents, children = parents_and_children(tracking, name)
    [dataset_input] = children[parents[1].info.run_id]["b"].inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.source)["uri"].startswith(f"{storage}/a/")
    assert {r.data.tags["arpipe.cache"] for r in children[parents[2].info.run_id].values()} == {"hit"}


def test_stop_a_running_job(open_head, story, monkeypatch):
    project, tracking, tmp, name = story
    write(project, {"pipeline.yaml": pipeline_yaml(name, str(tmp / "runs"), sleep=120)})
    submitted = arpipe("submit", "pipeline.yaml", "--address", open_head.address, "--tracking-uri", tracking,
                       cwd=project, check=True)
    job = submission_id(submitted.stdout)
    assert f"arpipe jobs logs {job} --follow" in submitted.stdout
    from ray.job_submission import JobSubmissionClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)            # Ray would prefer these to the address given
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    client = JobSubmissionClient(open_head.address)     # polled in-process: a CLI call per second is slow
    deadline = time.time() + 60
    while time.time() < deadline:
        logs = client.get_job_logs(job)
        if stage_lines(logs).get("b") == ["running"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"stage b never started:\n{logs}")
    stopped = arpipe("jobs", "stop", job, "--wait", "--address", open_head.address, cwd=project, check=True)
    assert stopped.stdout.strip() == f"{job}: STOPPED"
    status = arpipe("jobs", "status", job, "--address", open_head.address, cwd=project, check=True)
    assert f"{job}: STOPPED" in status.stdout


def test_mistakes_give_one_clear_line(open_head, story):
    project, tracking, tmp, name = story
    write(project, {"pipeline.yaml": pipeline_yaml(name, str(tmp / "runs"))})
    cases = {
        "bad address": (["--address", "http://127.0.0.1:not-a-port"], ["--address", "bad address"]),
        "not http": (["--address", "ftp://127.0.0.1:8265"], ["scheme must be http or https"]),
        "ray client address": (["--address", "ray://127.0.0.1:10001"], ["Ray Client address", ":8265"]),
        "unreachable head": (["--address", f"http://127.0.0.1:{free_port()}"], ["cannot reach the Ray dashboard"]),
        "gcs port, not the dashboard": (["--address", f"http://127.0.0.1:{open_head.gcs_port}"],
                                        ["does not answer like a Ray dashboard", "dashboard port"]),
    }
    for name, (args, needles) in cases.items():
        proc = arpipe("submit", "pipeline.yaml", *args, "--tracking-uri", tracking, cwd=project, timeout=60)
        try:
            assert_one_clear_line(proc, *needles)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
    missing = arpipe("submit", "nowhere.yaml", "--address", open_head.address, cwd=project)
    assert_one_clear_line(missing, "nowhere.yaml", "pipeline file not found")
    remote = arpipe("submit", "pipeline.yaml", "--address", "http://ray-head.invalid:8265", "--tracking-uri", tracking,
                    cwd=project)
    assert_one_clear_line(remote, "pipeline.yaml:2:", "is a folder on this machine", "is a file on this machine",
                          "s3://", "--allow-local-storage")
    gone = arpipe("jobs", "status", "raysubmit_nope", "--address", open_head.address, cwd=project)
    assert_one_clear_line(gone, "no job raysubmit_nope", "arpipe jobs list")


@pytest.mark.full   # a second Ray head (with token auth) for one story: make test-full
def test_token_auth_cluster(token_head, story):
    project, tracking, tmp, name = story
    write(project, {"pipeline.yaml": pipeline_yaml(name, str(tmp / "runs"))})
    home = tmp / "home"                 # no ~/.ray/auth_token: the token comes only from where each case says
    home.mkdir()
    with_token = {"HOME": str(home), "RAY_AUTH_TOKEN": token_head.token}
    first = arpipe("submit", "pipeline.yaml", "--address", token_head.address, "--tracking-uri", tracking,
                   "--follow", cwd=project, env=with_token, timeout=180, check=True)
    job = submission_id(first.stdout)
    assert stage_lines(first.stdout) == {"a": ["running", "done"], "b": ["running", "done"]}
    assert f"{job} SUCCEEDED" in first.stdout

    stock = stock_ray_job_submit(token_head, project, {"MLFLOW_TRACKING_URI": tracking},
                                 client_env={**with_token, "RAY_AUTH_MODE": "token"})
    assert stock.returncode == 0, stock.stdout + stock.stderr
    assert stage_lines(stock.stdout) == {"a": ["cached"], "b": ["cached"]}
    parents, children = parents_and_children(tracking, name)
    assert len(parents) == 2
    assert {r.data.tags["arpipe.cache"] for r in children[parents[1].info.run_id].values()} == {"hit"}

    token_file = tmp / "token"
    token_file.write_text(token_head.token + "\n")
    by_file = arpipe("jobs", "status", job, "--address", token_head.address, cwd=project,
                     env={"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token_file)}, check=True)
    assert f"{job}: SUCCEEDED" in by_file.stdout

    without = arpipe("submit", "pipeline.yaml", "--address", token_head.address, cwd=project,
                     env={"HOME": str(home)})
    assert_one_clear_line(without, token_head.address, "requires an authentication token", "RAY_AUTH_TOKEN")
    wrong = arpipe("jobs", "list", "--address", token_head.address, cwd=project,
                   env={"HOME": str(home), "RAY_AUTH_TOKEN": "not-the-token"})
    assert_one_clear_line(wrong, "rejected the token from RAY_AUTH_TOKEN", "ray get-auth-token")


def test_a_project_with_its_own_pipeline_and_stages_modules_runs_as_a_job(open_head, story):
    """The job's working_dir comes first on the job's sys.path: the user's pipeline/ and stages.py must win
    for their code, and arpipe (installed as arpipe.*) must still find its own modules."""
    from test_namespace import USER_MODULES

    project, tracking, tmp, name = story
    write(project, {**USER_MODULES, "pipeline.yaml": f"""
    name: {name}
    storage: {tmp / "runs"}
    stages:
      a: {{kind: python, callable: "pipeline.steps:make", config: {{n: 21}}}}
      b: {{kind: python, callable: "stages:total", inputs: {{n: "${{a.n}}"}}}}
    """})
    run = arpipe("submit", "pipeline.yaml", "--address", open_head.address, "--tracking-uri", tracking, "--wait",
                 cwd=project, timeout=180, check=True)
    assert f"{submission_id(run.stdout)} SUCCEEDED" in run.stdout
    made = json.loads(next((tmp / "runs").glob("a/*/outputs.json")).read_text())["outputs"]
    assert made["who"]["value"] == ["user pipeline package", "user stages module", "user schemas module",
                                    "user cluster module"]
    assert made["foreign"]["value"] == []
    total = json.loads(next((tmp / "runs").glob("b/*/outputs.json")).read_text())["outputs"]
    assert total["total"]["value"] == 42
