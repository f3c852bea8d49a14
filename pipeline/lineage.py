"""Lineage in MLflow: one parent run per ``arpipe run``, one nested run per stage.

Cache hits get a nested run too, tagged ``arpipe.cache=hit`` with the id of
the run that produced the output. Params are the flattened stage config with
secrets redacted; inputs are the upstream outputs with their content digests.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:   # Windows: no advisory locks; concurrent first runs there are on their own
    fcntl = None

from arpipe.pipeline import __version__
from arpipe.pipeline.config import redact, scrub

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: MLflow stores dataset digests in 36 characters; the full digest goes into the dataset profile
DATASET_DIGEST_CHARS = 32
PARAM_VALUE_MAX = 6000


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; sqlite paths made absolute."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def git_commit(folder: Path) -> str | None:
    if os.environ.get("ARPIPE_GIT_COMMIT"):   # set by `arpipe submit`: .git is not uploaded to the cluster
        return os.environ["ARPIPE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:PARAM_VALUE_MAX]
    return out


@contextlib.contextmanager
def _first_open_lock(uri: str) -> Iterator[None]:
    """One process at a time opens a SQLite tracking file.

    The first open creates its tables by migrations; two runs starting together on a fresh file
    both migrate, and the loser's half-done migration leaves the file unusable for every later run.
    """
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:") or fcntl is None:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Lineage:
    """Writes runs through MlflowClient with explicit run ids (no global active run)."""

    def __init__(self, uri: str, experiment: str, secrets: set[str] = frozenset()):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.secrets = set(secrets)
        with _first_open_lock(uri):
            self.client = MlflowClient(uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def start_parent(self, pipeline: str, resolved_yaml: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=pipeline, tags={
            "arpipe.pipeline": pipeline, "arpipe.version": __version__, **tags})
        self.client.log_text(run.info.run_id, self.scrub(resolved_yaml), "pipeline.yaml")
        return run.info.run_id

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    def start_stage(self, parent_id: str, name: str, kind: str, fingerprint: str, config: dict[str, Any],
                    inputs: list[dict[str, str]], tags: dict[str, str]) -> str:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param

        upstream_runs = sorted({i["run_id"] for i in inputs if i.get("run_id")})
        if upstream_runs:
            tags = {**tags, "arpipe.upstream_run_ids": ",".join(upstream_runs)}
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent_id, "arpipe.stage": name, "arpipe.kind": kind,
            "arpipe.fingerprint": fingerprint, "arpipe.version": __version__, **tags})
        params = flatten_params(redact(config, self.secrets))
        items = [Param(k[:250], v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        if inputs:
            datasets = [DatasetInput(Dataset(
                name=item["name"], digest=item["digest"][:DATASET_DIGEST_CHARS],
                source_type="s3" if item["uri"].startswith("s3://") else "local",
                source=json.dumps({"uri": item["uri"]}), schema=None,
                profile=json.dumps({"digest": item["digest"], "producer_run_id": item.get("run_id")})),
                tags=[InputTag("mlflow.data.context", "input")]) for item in inputs]
            self.client.log_inputs(run.info.run_id, datasets=datasets)
        return run.info.run_id

    def finish_stage(self, run_id: str, status: str, outputs_json: str | None = None,
                     error: str | None = None) -> None:
        if outputs_json is not None:
            self.client.log_text(run_id, outputs_json, "outputs.json")
        if error:
            self.client.set_tag(run_id, "arpipe.error", self.scrub(error)[:4000])
        self.client.set_terminated(run_id, status, end_time=int(time.time() * 1000))

    def finish_parent(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status, end_time=int(time.time() * 1000))
