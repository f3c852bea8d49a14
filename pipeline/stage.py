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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from arpipe.pipeline.lineage import DeferredRunLog, RunLog, StageLog
from arpipe.schemas.base import Resources, StageBase


def ray_resources(resources: Resources) -> dict[str, Any]:
    """A config's ``resources`` as Ray task options (``num_cpus``, ``num_gpus``, ``memory`` when set)."""
    options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory:
        options["memory"] = resources.memory
    return options


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


#: environment a stage's Ray tasks need from the driver (a shared Ray cluster may predate it)
FORWARDED_ENV = ("AWS_", "MLFLOW_", "ARPIPE_")


@dataclass
class StageContext:
    """What a stage is given: where to write, its inputs, and its MLflow run (through ``run_log``)."""

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
    #: True on a Ray task: what the stage logs goes back to the driver, which writes it to MLflow
    #: (``lineage.DeferredRunLog``; opening MLflow would cost each new worker ~3 s)
    defer_lineage: bool = False
    _run_log: RunLog | None = field(default=None, repr=False)

    @property
    def run_log(self) -> RunLog:
        """This stage's MLflow run: metrics, tags, artifacts, tables, logged models (no-ops when lineage is off)."""
        if self._run_log is None:
            self._run_log = (DeferredRunLog(self.mlflow_run_id) if self.defer_lineage
                             else RunLog(self.tracking_uri, self.mlflow_run_id))
        return self._run_log

    def deferred_log(self) -> StageLog | None:
        """What the stage logged for the driver to write (``defer_lineage``); None when there is nothing."""
        if isinstance(self._run_log, DeferredRunLog) and self._run_log.record:
            return self._run_log.record
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run_log.log_metrics(metrics, step)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.run_log.log_artifact(local_path, artifact_path)

    @staticmethod
    def staging_dir(uri: str) -> Path:
        """The local folder that stands for ``uri``: the path itself when local, a cache folder for S3."""
        from arpipe.pipeline.outputs import staging_dir  # outputs imports this module

        return staging_dir(uri)

    @staticmethod
    def forwarded_env() -> dict[str, str]:
        """The driver's AWS/MLflow/arpipe settings, for the Ray tasks and actors a stage starts."""
        return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}

    @staticmethod
    def with_env(env: dict[str, str], func: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``func`` with ``env`` set: how a stage's Ray tasks see the driver's AWS/MLflow settings
        on a worker that a shared, longer-lived cluster started before them. Picklable as a Ray task."""
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return func(*args, **kwargs)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


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
    def check_across(cls, spec: StageBase, stages: Mapping[str, StageBase]) -> str | None:
        """Checks that read other stages' configs (``stages``: the pipeline's, by name, their ``${stage.output}``
        references unresolved), run where :meth:`check` runs and answered as it is."""
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
        return ray_resources(resources)

    @abstractmethod
    def run(self) -> dict[str, Output | Any]:
        """Do the work into ``ctx.work_dir``; return the named outputs."""
