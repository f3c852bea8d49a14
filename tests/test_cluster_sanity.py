"""Before anything reaches a cluster: can its nodes see the storage and MLflow, which token, what gets sent.

No cluster is started here: these are the checks `arpipe submit` makes on the
user's machine, on real pipeline files. Remote hosts are `.invalid` names and
documentation addresses (203.0.113.0/24), which nothing here ever contacts.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess

import pytest
from helpers import write

from arpipe.cluster import client, commands, submission
from arpipe.pipeline.config import load_pipeline
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.ledger import Ledger
from arpipe.pipeline.remote import address_host, check_cluster_ready, is_local_address

PIPELINE = """
name: sanity
storage: {storage}
stages:
  a:
    kind: python
    callable: steps:make
    config: {{n: 3}}
"""
STEPS = """
def make(config, inputs, out_dir):
    return {"n": config["n"]}
"""
REMOTE = "http://ray-head.invalid:8265"
SERVER = "http://mlflow.invalid:5000"


def project(folder, storage="./runs", extra: dict[str, str] | None = None):
    write(folder, {"pipeline.yaml": PIPELINE.format(storage=storage), "steps.py": STEPS, **(extra or {})})
    return folder / "pipeline.yaml"


@pytest.mark.parametrize("address", [None, "local", "auto", "127.0.0.1:6379", "http://localhost:8265",
                                     "[::1]:6379", "ray://127.0.0.1:10001", "http://127.0.0.1:8265/"])
def test_a_local_cluster_may_use_local_storage_and_sqlite(tmp_path, address):
    loaded = load_pipeline(project(tmp_path))
    assert is_local_address(address)
    check_cluster_ready(loaded, address, f"sqlite:///{tmp_path}/mlflow.db", allow_local_storage=False)


def test_an_address_of_this_machine_is_local():
    import psutil

    ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    for ip in ips:
        assert is_local_address(f"{ip}:6379"), ip
    assert not is_local_address("203.0.113.7:6379")
    assert not is_local_address(REMOTE)
    assert address_host("http://[::1]:8265") == "::1"


def test_a_remote_cluster_with_local_storage_and_sqlite_is_one_line_naming_both(tmp_path):
    loaded = load_pipeline(project(tmp_path))
    with pytest.raises(UserError) as err:
        check_cluster_ready(loaded, REMOTE, f"sqlite:///{tmp_path}/mlflow.db", allow_local_storage=False)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{tmp_path / 'pipeline.yaml'}:2:10: storage ./runs is a folder on this machine")
    assert "MLflow tracking sqlite:///" in text and "ray-head.invalid" in text
    assert "s3://" in text and "MLFLOW_TRACKING_URI=http://" in text and "--allow-local-storage" in text
    check_cluster_ready(loaded, REMOTE, f"sqlite:///{tmp_path}/mlflow.db", allow_local_storage=True)


@pytest.mark.parametrize("tracking, bad", [
    (SERVER, False), ("https://mlflow.example.org", False), ("postgresql://db.invalid/mlflow", False),
    ("databricks", False), ("sqlite:///mlflow.db", True), ("file:///tmp/mlruns", True), ("mlruns", True),
    ("http://127.0.0.1:5000", True), ("http://localhost:5000", True)])
def test_s3_storage_needs_a_tracking_server_the_cluster_can_reach(tmp_path, tracking, bad):
    loaded = load_pipeline(project(tmp_path, storage="s3://bucket/runs"))
    if not bad:
        check_cluster_ready(loaded, "203.0.113.7:6379", tracking, allow_local_storage=False)
        return
    with pytest.raises(UserError) as err:
        check_cluster_ready(loaded, "203.0.113.7:6379", tracking, allow_local_storage=False)
    assert str(err.value).startswith(f"{tmp_path / 'pipeline.yaml'}: MLflow tracking {tracking}")
    assert "is a folder on this machine" not in str(err.value)


def test_a_port_forwarded_cluster_is_judged_by_its_nodes(tmp_path):
    loaded = load_pipeline(project(tmp_path))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(UserError) as err:
        check_cluster_ready(loaded, "http://127.0.0.1:8265", tracking, False, node_ips=["127.0.0.1", "203.0.113.7"])
    assert "behind 127.0.0.1 (nodes at 203.0.113.7)" in str(err.value)
    check_cluster_ready(loaded, "http://127.0.0.1:8265", tracking, False, node_ips=["127.0.0.1"])


def test_an_override_of_storage_is_what_the_error_points_at(tmp_path):
    loaded = load_pipeline(project(tmp_path, storage="s3://bucket/runs"), ["storage=/mnt/runs"])
    with pytest.raises(UserError) as err:
        check_cluster_ready(loaded, REMOTE, SERVER, allow_local_storage=False)
    assert str(err.value).startswith("-s storage=/mnt/runs: storage /mnt/runs is a folder on this machine")


def test_the_token_is_read_where_ray_reads_it(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert client.read_auth_token({"HOME": str(home)}) is None
    (home / ".ray" / "auth_token").write_text("from-home\n")
    file = tmp_path / "token"
    file.write_text(" from-path \n")
    env = {"HOME": str(home)}
    assert client.read_auth_token(env) == client.Token("from-home", str(home / ".ray" / "auth_token"))
    env["RAY_AUTH_TOKEN_PATH"] = str(file)
    assert client.read_auth_token(env) == client.Token("from-path", f"RAY_AUTH_TOKEN_PATH={file}")
    env["RAY_AUTH_TOKEN"] = "from-env"
    assert client.read_auth_token(env) == client.Token("from-env", "RAY_AUTH_TOKEN")
    with pytest.raises(UserError, match="cannot read the Ray token file"):
        client.read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="the Ray token file is empty"):
        client.read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


@pytest.mark.parametrize("given, expected", [
    ("http://10.0.0.5:8265", "http://10.0.0.5:8265"), ("head:8265", "http://head:8265"), ("head", "http://head:8265"),
    ("https://ray.example.org", "https://ray.example.org"), ("http://head:8265/", "http://head:8265"),
    ("https://gw.example.org:443/ray", "https://gw.example.org:443/ray"), ("http://[::1]:8265", "http://[::1]:8265"),
    ("[::1]", "http://[::1]:8265")])
def test_dashboard_addresses(given, expected):
    assert client.dashboard_address(given) == expected


@pytest.mark.parametrize("given, message", [
    ("ray://head:10001", "Ray Client address"), ("grpc://head:6379", "scheme must be http or https"),
    ("http://head:99999", "bad address"), ("http://:8265", "bad address"), ("head:port", "bad address")])
def test_bad_dashboard_addresses(given, message):
    with pytest.raises(UserError, match=message):
        client.dashboard_address(given)


def submit_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arpipe")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["submit", *argv])


def test_what_submit_sends(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = project(tmp_path / "proj", extra={"requirements.txt": "einops==0.8.0  # why\n\nrich\n"})
    git = ["git", "-C", str(tmp_path / "proj"), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "project"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.invalid")
    args = submit_args(str(pipeline), "--address", "http://127.0.0.1:8265", "-s", "stages.a.config.n=4",
                       "--only", "a", "--force", "a", "--env", "AWS_*", "--env", "EXTRA=1",
                       "--pip", "proj/requirements.txt", "--pip", "tqdm>=4", "--exclude", "*.ckpt",
                       "--tracking-uri", "sqlite:///mlflow.db")
    prepared = submission.prepare(args, client.dashboard_address(args.address))
    runs = tmp_path / "proj" / "runs"
    assert shlex.split(prepared.entrypoint) == ["python", "-m", "arpipe", "run", "pipeline.yaml",
                                                "-s", "stages.a.config.n=4", "-s", f"storage={runs}",
                                                "--only", "a", "--force", "a"]
    env = prepared.runtime_env
    assert env["working_dir"] == str(tmp_path / "proj")
    assert {".git/", ".venv/", "mlflow.db", "mlruns/", "/data/", "/runs/", "*.ckpt"} <= set(env["excludes"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert env["env_vars"]["AWS_REGION"] == "eu-west-1" and env["env_vars"]["EXTRA"] == "1"
    assert env["pip"]["packages"] == ["einops==0.8.0", "rich", "tqdm>=4"]
    assert prepared.metadata["arpipe.pipeline"] == "sanity"
    # .git/ is not uploaded: the commit goes along for the lineage tags
    assert env["env_vars"]["ARPIPE_GIT_COMMIT"] == head == prepared.metadata["arpipe.git_commit"]
    assert prepared.base_id.startswith("arpipe-sanity-")


def test_submit_refuses_what_it_cannot_send(tmp_path, monkeypatch):
    pipeline = project(tmp_path / "proj", storage="s3://bucket/runs")
    outside = submit_args(str(pipeline), "--address", REMOTE, "--working-dir", str(tmp_path / "elsewhere"),
                          "--tracking-uri", SERVER)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UserError, match="outside the uploaded project folder"):
        submission.prepare(outside, REMOTE)
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    unset = submit_args(str(pipeline), "--address", REMOTE, "--env", "NOT_SET_ANYWHERE", "--tracking-uri", SERVER)
    with pytest.raises(UserError, match="NOT_SET_ANYWHERE is not set in this shell"):
        submission.prepare(unset, REMOTE)
    remote = submit_args(str(pipeline), "--address", REMOTE, "--tracking-uri", SERVER)
    assert "-s storage=" not in submission.prepare(remote, REMOTE).entrypoint


def test_a_storage_from_the_environment_travels_resolved(tmp_path, monkeypatch):
    """The loader says which values came from ``${env:...}``; a bucket named that way reaches the job as this
    machine resolved it (the cluster's environment may not have the variable, or another value)."""
    monkeypatch.setenv("ARPIPE_STORAGE", "s3://bucket/from-env")
    pipeline = project(tmp_path / "proj", storage="${env:ARPIPE_STORAGE}")
    assert load_pipeline(pipeline).from_env == {("storage",): ("ARPIPE_STORAGE",)}
    prepared = submission.prepare(submit_args(str(pipeline), "--address", REMOTE, "--tracking-uri", SERVER), REMOTE)
    assert shlex.split(prepared.entrypoint)[-2:] == ["-s", "storage=s3://bucket/from-env"]
    assert prepared.metadata["arpipe.storage"] == "s3://bucket/from-env"

    # a bucket written out is sent as written, even when a comment on its line mentions ${env:...}
    literal = project(tmp_path / "literal", storage="s3://bucket/runs  # or ${env:ARPIPE_STORAGE}")
    assert load_pipeline(literal).from_env == {}
    sent = submission.prepare(submit_args(str(literal), "--address", REMOTE, "--tracking-uri", SERVER), REMOTE)
    assert "-s storage=" not in sent.entrypoint
    # ... and an override that reads the environment counts as the environment's
    assert load_pipeline(literal, ["storage=${env:ARPIPE_STORAGE}"]).from_env == {("storage",): ("ARPIPE_STORAGE",)}


def test_a_jobs_mlflow_run_is_read_from_its_runs_ledger(tmp_path):
    """Each attempt names its run; `submit --wait` and `jobs status` find the MLflow run in that run's ledger."""
    runs = tmp_path / "runs"
    pipeline = project(tmp_path / "proj", storage=str(runs))
    args = submit_args(str(pipeline), "--address", "http://127.0.0.1:8265", "--tracking-uri", SERVER)
    prepared = submission.prepare(args, "http://127.0.0.1:8265")
    first, retry = prepared.attempt(0), prepared.attempt(1)
    assert (first.submission_id, retry.submission_id) == (prepared.base_id, f"{prepared.base_id}-retry1")
    assert first.runtime_env["env_vars"]["ARPIPE_RUN_ID"] == first.metadata["arpipe.run_id"] == first.run_id
    assert retry.run_id != first.run_id and retry.metadata["arpipe.attempt"] == "1"
    assert "ARPIPE_RUN_ID" not in prepared.runtime_env["env_vars"]
    assert submission.recorded_run(first.metadata) is None              # the job has not run yet

    parent = "0123456789abcdef0123456789abcdef"
    Ledger(str(runs), "sanity", first.run_id, parent).stage("a", state="running")    # what `arpipe run` writes
    run = submission.recorded_run(first.metadata)
    assert run is not None and run.describe() == f"MLflow run {parent} in experiment 'sanity' ({SERVER})"
    assert commands._mlflow_suffix(run) == f" (MLflow run {parent})"
    # the ledger is another run's (then only the MLflow server could say: tests/test_cluster_jobs.py asks it)
    assert submission.recorded_run(retry.metadata, search_mlflow=False) is None
    assert submission.recorded_run({"arpipe.pipeline": "sanity"}) is None   # a job `arpipe submit` did not send
    assert submission.recorded_run(None) is None


def test_a_cluster_that_cannot_run_arpipe_is_named_with_the_fix():
    """The last lines of a job whose head lacks arpipe, as sh, dash and Python print them."""
    from arpipe.cluster.commands import diagnose

    for tail in (["/bin/sh: 1: python: not found"], ["/bin/sh: python: command not found"],
                 ["/usr/bin/python: No module named arpipe"],
                 ["Traceback (most recent call last):", "ModuleNotFoundError: No module named 'arpipe'"]):
        assert "cannot run arpipe" in diagnose(["Running entrypoint for job x: python -m arpipe run p.yaml",
                                                *tail]), tail
    assert diagnose(["arpipe: error: stage(s) failed: train: out of memory"]) is None
