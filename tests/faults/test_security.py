"""Security: plain-data YAML, no pickle, tar shards that stay inside, secrets out of everything written.

Also: what arpipe serves binds 127.0.0.1 by default, and a `python` stage is documented as
the code execution it is. Secrets are searched for byte for byte in every file a run leaves
(storage, MLflow's database and artifacts) and in every line it prints.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from helpers import arpipe, spawn, stage_lines, write

from faults.harness import leaks
from faults.tally import TALLY

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "bad"
PRODUCT = [ROOT / "pipeline", ROOT / "stages", ROOT / "cluster", ROOT / "schemas"]
MARKER = Path("/tmp/arpipe-corpus-pwned")   # what the corpus' YAML tag and pickle would create if run

#: credentials in the environment (as a cloud machine has them) and a secret written into the config
ENV_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAULTSUITE7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAULTSUITE",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEBYaDFAULTSUITESESSION",
    "DB_PASSWORD": "hunter2-faultsuite",
}
CONFIG_SECRET = "tok-config-secret-5f1e"
ROTATED_SECRET = "tok-rotated-secret-9a2c"


STEPS = '''
import os


def fetch(config, inputs, out_dir):
    # the stage does get the real credentials: only what arpipe writes must not hold them
    assert config["aws_secret_access_key"] == os.environ["AWS_SECRET_ACCESS_KEY"]
    assert config["api_token"].startswith("tok-")
    return {"n": 3}


def report(config, inputs, out_dir):
    return {"total": inputs["n"] * 2}


def login(config, inputs, out_dir):
    raise PermissionError(f"login refused for password {config['password']} and token {config['api_token']}")
'''

PIPELINE = f"""
name: secrets
storage: ./runs
stages:
  fetch:
    kind: python
    callable: steps:fetch
    config:
      bucket: s3://data/raw
      aws_access_key_id: "${{env:AWS_ACCESS_KEY_ID}}"
      aws_secret_access_key: "${{env:AWS_SECRET_ACCESS_KEY}}"
      session: "${{env:AWS_SESSION_TOKEN}}"
      api_token: {CONFIG_SECRET}
      database: "postgres://app:${{env:DB_PASSWORD}}@db.internal/app"
    resources: {{num_cpus: 0}}
  report:
    kind: python
    callable: steps:report
    inputs: {{n: "${{fetch.n}}"}}
    resources: {{num_cpus: 0}}
  login:
    kind: python
    callable: steps:login
    config: {{password: "${{env:DB_PASSWORD}}", api_token: {CONFIG_SECRET}}}
    resources: {{num_cpus: 0}}
"""


def test_secret_names_are_matched_by_segment():
    from arpipe.pipeline.config import SECRET_KEY, redact

    secret = ["api_token", "token", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "password",
              "DB_PASSWORD", "client_secret", "private_key", "apiKey", "credentials", "hf-token"]
    plain = ["tokenizer", "max_tokens", "tokens", "tokens_per_sample", "private", "keyframes", "passes"]
    assert [k for k in secret if not SECRET_KEY.search(k)] == []
    assert [k for k in plain if SECRET_KEY.search(k)] == []
    config = {"tokenizer": "${tok.tokenizer}", "tokens": 10, "api_token": "abc", "uri": "s3://k:hunter2@h/x"}
    assert redact(config, {"hunter2"}) == {"tokenizer": "${tok.tokenizer}", "tokens": 10, "api_token": "***",
                                           "uri": "s3://k:***@h/x"}


def test_secrets_never_reach_mlflow_storage_or_logs(tmp_path, fault_ray):
    write(tmp_path, {"steps.py": STEPS, "pipeline.yaml": PIPELINE})
    env = {**ENV_SECRETS, "RAY_ADDRESS": fault_ray.address}
    first = arpipe("run", "pipeline.yaml", cwd=tmp_path, env=env)
    assert first.returncode != 0 and "login" in first.stderr, first.stdout + first.stderr   # login fails
    assert stage_lines(first.stdout)["report"][-1] == "done", first.stdout
    rotated = ["-s", f"stages.fetch.config.api_token={ROTATED_SECRET}"]
    plan = arpipe("plan", "pipeline.yaml", *rotated, cwd=tmp_path, env=env)
    second = arpipe("run", "pipeline.yaml", *rotated, cwd=tmp_path, env=env)
    status = arpipe("status", "pipeline.yaml", cwd=tmp_path, env=env)
    texts = {f"{name} {stream}": getattr(proc, stream) for name, proc in
             (("run", first), ("plan", plan), ("rerun", second), ("status", status)) for stream in ("stdout", "stderr")}
    secrets = {**ENV_SECRETS, "config api_token": CONFIG_SECRET, "rotated api_token": ROTATED_SECRET}
    # the user's own files hold their config; everything else (storage, mlflow.db, mlruns/) is arpipe's
    found = leaks(secrets, texts, [tmp_path], skip={"pipeline.yaml", "steps.py"})
    TALLY.leaks(len(found))
    assert not found, "\n".join(found)
    assert json.loads(next(tmp_path.glob("runs/report/*/outputs.json")).read_text())["outputs"]["total"]["value"] == 6


# ---------------------------------------------------------------------------------- no code from data


def product_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for folder in PRODUCT:
        for path in folder.rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            calls += [(f"{path.relative_to(ROOT)}:{node.lineno}", node) for node in ast.walk(tree)
                      if isinstance(node, ast.Call)]
    return calls


def dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_no_yaml_tags_no_pickle_in_the_product():
    """YAML is composed with SafeLoader; torch.load only with weights_only=True; no pickle, marshal or eval."""
    problems = []
    for where, call in product_calls():
        name = dotted(call.func)
        if name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            loader = keyword(call, "Loader")
            if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                problems.append(f"{where}: {name} without SafeLoader")
        if name in ("torch.load",) and keyword(call, "weights_only") is not True:
            problems.append(f"{where}: torch.load without weights_only=True")
        if name.split(".")[-1] in ("loads", "load") and name.split(".")[0] in ("pickle", "cloudpickle", "dill",
                                                                              "marshal", "joblib"):
            problems.append(f"{where}: {name}")
        if name in ("np.load", "numpy.load") and keyword(call, "allow_pickle") is True:
            problems.append(f"{where}: np.load with allow_pickle=True")
        if name in ("eval", "exec"):
            problems.append(f"{where}: {name}")
    assert not problems, problems


def test_a_pickle_in_a_model_folder_is_never_unpickled():
    import pickle

    import torch

    MARKER.unlink(missing_ok=True)
    payload = CORPUS / "models" / "pickle_weights" / "model.pt"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(payload, weights_only=True)
    assert not MARKER.exists()
    # models are read from safetensors only: the loader never looks at model.pt
    source = (ROOT / "stages" / "models" / "io.py").read_text()
    assert "safetensors" in source and "torch.load" not in source


def test_yaml_tags_never_construct_objects(tmp_path):
    MARKER.unlink(missing_ok=True)
    for name in ("python_tag.yaml", "python_name_tag.yaml"):
        (tmp_path / name).write_text((CORPUS / "pipelines" / name).read_text())
        for command in ("validate", "plan"):
            proc = arpipe(command, name, cwd=tmp_path, timeout=60)
            assert proc.returncode == 2 and "is not allowed" in proc.stderr, proc.stderr
    assert not MARKER.exists() and not list(tmp_path.glob("pwned"))


# ------------------------------------------------------------------------------------- tar shards


def test_tar_members_that_would_leave_the_shard_are_refused(tmp_path):
    from arpipe.stages.modalities import SampleError, open_reader

    before = set(Path("/tmp").iterdir())
    for name, member in (("traversal", "../../escaped.png"), ("absolute", "/tmp/arpipe-absolute.png"),
                         ("symlink_out", "s2.png"), ("hardlink_out", "s3.png")):
        reader = open_reader("image", str(CORPUS / "tars" / f"{name}.tar"), channels=1, size=8)
        [unit] = reader.units()
        samples = []
        with pytest.raises(SampleError) as err:
            for sample in reader.read(unit):
                samples.append(sample.key)
        assert samples == [f"{name}.tar/s0", f"{name}.tar/s1"], samples     # the good members are kept
        assert member in str(err.value) and "would leave the shard" in str(err.value)
    assert not Path("/tmp/arpipe-absolute.png").exists() and not (ROOT.parent / "escaped.png").exists()
    assert set(Path("/tmp").iterdir()) - before <= {p for p in Path("/tmp").iterdir() if p.name.startswith("pytest")}


# ------------------------------------------------------------------------------ servers bind 127.0.0.1


def listening(pid: int) -> set[tuple[str, int]]:
    out = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return out


@pytest.mark.full   # starts the MLflow UI server (~20 s); the embedded run's dashboard binding is checked below in make test
def test_arpipe_ui_serves_mlflow_on_localhost_only(tmp_path):
    """`arpipe ui` serves the MLflow UI (and its REST API) for the project's tracking database, bound to
    127.0.0.1 and nothing else."""
    import urllib.request

    from s3server import free_port

    port = free_port()
    proc = spawn("ui", "--port", str(port), cwd=tmp_path)
    try:
        deadline = time.time() + 240   # a loaded machine: the test suite's other half runs meanwhile
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "MLflow UI did not come up"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5",
                                    timeout=5) as response:
            assert b"experiments" in response.read()
        assert (tmp_path / "mlflow.db").exists()
        addresses = {ip for ip, p in listening(proc.pid)}
        assert port in {p for _ip, p in listening(proc.pid)} and addresses <= {"127.0.0.1"}, \
            f"arpipe ui listens on {addresses}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_an_embedded_run_serves_no_dashboard_beyond_localhost(tmp_path):
    """Without --address arpipe starts Ray itself: its dashboard process runs headless, bound to 127.0.0.1.

    (Ray's own gRPC ports -- GCS, raylet, workers -- listen on every interface whatever ``ray.init``
    is told; docs/reliability.md says so. This test holds arpipe to the HTTP surface it controls.)
    """
    write(tmp_path, {"steps.py": "import time\n\ndef nap(config, inputs, out_dir):\n    time.sleep(8)\n    return {}\n",
                     "pipeline.yaml": "name: embedded\nstorage: ./runs\nstages:\n  a: {kind: python, callable: "
                                      "'steps:nap'}\n"})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = spawn("run", "pipeline.yaml", cwd=tmp_path, env=env)
    try:
        deadline = time.time() + 120
        while not any("ray::arpipe:a" in " ".join(p.cmdline()) for p in _tree(proc.pid)):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.3)
        dashboards = [p for p in _tree(proc.pid) if "dashboard/dashboard.py" in " ".join(p.cmdline())]
        for dashboard in dashboards:
            command = " ".join(dashboard.cmdline())
            assert "--host=127.0.0.1" in command and "--disable-frontend" in command, command
            http = re.search(r"--port=(\d+)", command)
            port = int(http.group(1)) if http else 8265
            # its HTTP port (Ray's gRPC ports bind every interface whatever it is told: see the docstring)
            assert {ip for ip, p in listening(dashboard.pid) if p == port} <= {"127.0.0.1"}
        assert not [(ip, port) for ip, port in listening(proc.pid) if port == 8265 and ip != "127.0.0.1"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


# -------------------------------------------------------------------------- python stages are code


def test_python_stages_are_documented_as_code_execution():
    from arpipe.schemas.pipeline import PythonStage

    assert "arbitrary code execution" in (PythonStage.__doc__ or "")
    schema = arpipe("schema", cwd=ROOT, check=True).stdout
    assert re.search(r"code execution", schema), "the JSON Schema does not say a python stage runs code"
    assert "executes your code" in (ROOT / "README.md").read_text()
    assert "code execution" in (ROOT / "docs" / "reliability.md").read_text()
    assert "executes user code" in (ROOT / "stages" / "python.py").read_text()
