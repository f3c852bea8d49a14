"""`arpipe ui` serves the MLflow UI for the tracking backend on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

from helpers import spawn
from s3server import free_port


def test_ui_serves_mlflow_on_localhost(tmp_path):
    port = free_port()
    proc = spawn("ui", "--port", str(port), cwd=tmp_path)
    try:
        deadline = time.time() + 90
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
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
