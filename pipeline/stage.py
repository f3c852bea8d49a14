"""The stage interface: what a stage kind implements and what it is given.

A stage kind is a class with a config model (in ``schemas``), named outputs,
a ``version`` (bump it when the same config would now produce different
outputs), and ``run(ctx)``. It works in resumable units inside
``ctx.work_dir``; what it finds there from an interrupted run it may reuse.
It returns its named outputs; the runner then hashes what it wrote and
commits ``outputs.json`` last.

Stage modules must be cheap to import: torch, ray and deepspeed are imported
inside ``run``, so that ``validate`` and ``plan`` stay light.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from arpipe.schemas.base import StageBase


@dataclass(frozen=True)
class Output:
    """A named output a stage returns: a path inside its folder, or a JSON value.

    ``digest`` may be given when the stage knows its output's content digest
    already (a token store's manifest carries one); otherwise the runner
    computes it from the files.
    """

    path: str | None = None
    value: Any = None
    digest: str | None = None


@dataclass
class StageContext:
    name: str
    kind: str
    fingerprint: str
    #: final location of the stage's outputs on storage (local path or s3://)
    out_uri: str
    #: local folder the stage writes into: out_uri itself for local storage, a staging folder for S3
    work_dir: Path
    pipeline_dir: Path
    #: resolved upstream outputs, by "stage.output"
    inputs: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    code_digest: str | None = None
    #: files the stage wrote straight to storage with digests it already knows:
    #: relpath -> (bytes, '<algorithm>:<hex>'); they are not downloaded again to be hashed
    known_files: dict[str, tuple[int, str]] = field(default_factory=dict)
    _client: Any = field(default=None, repr=False)

    def mlflow(self):
        """An MlflowClient for this stage's run (None when lineage is off)."""
        if self.mlflow_run_id is None:
            return None
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        client = self.mlflow()
        if client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for lo in range(0, len(rows), 1000):   # MLflow takes at most 1000 metrics per batch (per-class scores)
            client.log_batch(self.mlflow_run_id, metrics=rows[lo:lo + 1000])

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        client = self.mlflow()
        if client is not None:
            client.log_artifact(self.mlflow_run_id, str(local_path), artifact_path)


class Stage(ABC):
    """Base class of stage kinds. Subclasses set ``kind``, ``version`` and implement ``run``."""

    kind: ClassVar[str]
    version: ClassVar[str] = "1"
    #: "task": runs as one Ray task with the spec's resources; "driver": runs in a driver thread and
    #: starts its own Ray work (trainers, actor pools)
    placement: ClassVar[str] = "task"

    def __init__(self, spec: StageBase, ctx: StageContext):
        self.spec = spec
        self.ctx = ctx

    @classmethod
    def code_digest(cls, spec: StageBase, pipeline_dir: Path) -> str | None:
        """A digest of user code the output depends on (None: only the stage version matters)."""
        return None

    @classmethod
    def check(cls, spec: StageBase) -> str | None:
        """Checks beyond the config model's, run by `validate`, `plan` and `run` before Ray starts.

        Returns a problem as one sentence with its fix (None when fine). Must stay cheap: no torch.
        """
        return None

    @classmethod
    def source_digest(cls, spec: StageBase, pipeline_dir: Path) -> str | None:
        """A digest of raw data the stage reads from outside the pipeline (a dataset folder or bucket).

        Without it a cache would be keyed on the source's *path*: new files at the same place
        would go unnoticed. Listing-based (names, sizes, modification times or ETags) keeps it cheap.
        """
        return None

    @classmethod
    def ray_options(cls, spec: StageBase) -> dict[str, Any]:
        resources = getattr(spec, "resources", None)
        if resources is None:
            return {"num_cpus": 1}
        options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
        if resources.memory:
            options["memory"] = resources.memory
        return options

    @abstractmethod
    def run(self) -> dict[str, Output | Any]:
        """Do the work into ``ctx.work_dir``; return the named outputs."""
