"""Shared fixtures: one real S3 server and one Ray instance per test session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Ray 2.60 turns token auth on by default; the tests' own cluster runs without it
# so that `arpipe run --address` subprocesses can join.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("PYTHONUNBUFFERED", "1")

#: what the tests' processes would otherwise keep in the home folder (matplotlib's font cache, ~/.ray, ...):
#: a fresh folder per test session, so that nothing an earlier run left there can change what a run does.
#: DeepSpeed's JIT-built op (40 s to build) is kept in the checkout instead (.cache/, git-ignored): a build
#: lock a killed process leaves there is taken over by `load_jit_ops` (it once hung the suite in ~/.cache)
SESSION_HOME = Path(tempfile.mkdtemp(prefix="arpipe-tests-home-"))
for _name, _sub in (("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config"),
                    ("HOME", "home")):
    os.environ[_name] = str(SESSION_HOME / _sub)
    (SESSION_HOME / _sub).mkdir()
os.environ["TORCH_EXTENSIONS_DIR"] = str(ROOT / ".cache" / "torch_extensions")


def pytest_unconfigure(config) -> None:
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS variables pointing at the test server, set for this test (and its subprocesses)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.env


@pytest.fixture
def s3_bucket(s3_server, s3_env) -> str:
    """A fresh bucket URI (s3://...) on the test server."""
    return s3_server.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """DeepSpeed's JIT-built CPU op, built (once per checkout) before any Ray instance starts, so that train
    workers load it rather than each waiting on one build."""
    import subprocess

    subprocess.run([sys.executable, "-c", "from arpipe.stages.train.loop import load_jit_ops; load_jit_ops()"],
                   check=True, timeout=900)


@pytest.fixture(scope="session")
def ray_cluster(deepspeed_ops):
    """One local Ray instance for the session; yields its GCS address for subprocess drivers."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models run faster on one thread than two on a shared two-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
