"""What ``--json`` prints: one JSON object per command, the contract for scripts that read arpipe's output.

``arpipe validate|plan|status|gc --json``, ``arpipe jobs list|status --json`` and ``arpipe store info --json``
print one of these models, nothing else, on stdout (errors stay one line on stderr with their exit code).
Fields are only added, never renamed or retyped, within a ``schema_version``; a missing value is ``null``,
never ``"-"``. Their JSON Schemas are checked in under ``schemas/cli/`` (``python -m arpipe.schemas.export``)
and listed in docs/cli.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from arpipe.schemas.store import StoreManifest

SCHEMA_VERSION = 1


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="raised when a field changes meaning")


class _PipelineOutput(_Output):
    pipeline: str = Field(description="the pipeline file, as resolved")
    name: str = Field(description="the pipeline's name")


class ValidateOutput(_PipelineOutput):
    """``arpipe validate --json``: the pipeline is valid (an invalid one exits 2 with its line on stderr)."""

    ok: Literal[True] = Field(True, description="always true: an invalid file prints no JSON")
    stages: list[str] = Field(description="every stage, in the order a run takes them")


class PlannedStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    kind: str = Field(description="the stage kind (python, tokenizer, tokenize, train, sample, evaluate, ...)")
    action: Literal["run", "cached", "resume", "blocked"]
    fingerprint: str | None = Field(description="the full fingerprint; null until the upstream is built")
    why: str = Field(description="the reason, as `arpipe plan` prints it")


class PlanOutput(_PipelineOutput):
    """``arpipe plan --json``: what a run would do with each stage."""

    stages: list[PlannedStage] = Field(description="every stage, in run order")


class StageState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    kind: str
    state: Literal["done", "cached", "running", "failed", "pending"] = Field(
        description="cached: the last run found it built; done: built by the last run or an earlier one")
    fingerprint: str | None = Field(description="the full fingerprint; null until the upstream is built")
    duration_s: float | None = Field(description="how long the run that built it took")
    mlflow_run_id: str | None = Field(description="the stage's MLflow run")
    output: str | None = Field(description="the stage's output folder (local path or s3:// URI)")
    note: str | None = Field(description="why it failed, or that interrupted work will resume")


class StatusOutput(_PipelineOutput):
    """``arpipe status --json``: each stage's state."""

    stages: list[StageState] = Field(description="every stage, in run order")


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    submission_id: str
    status: Literal["PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"] = Field(description="Ray's job status")
    pipeline: str | None = Field(description="the pipeline's name, for jobs `arpipe submit` started")
    file: str | None = Field(description="the pipeline file, for jobs `arpipe submit` started")
    entrypoint: str = Field(description="the command the job runs")
    start_time: float | None = Field(description="Unix time in seconds")
    end_time: float | None = Field(description="Unix time in seconds; null while it runs")
    message: str | None = Field(description="Ray's message about the job")
    mlflow_run_id: str | None = Field(description="the pipeline's MLflow run, once the job recorded it")
    dashboard_url: str = Field(description="the job's page on the Ray dashboard")


class JobsOutput(_Output):
    """``arpipe jobs list --json``: the cluster's jobs, newest first."""

    address: str = Field(description="the cluster's dashboard address")
    jobs: list[Job]


class JobOutput(_Output):
    """``arpipe jobs status ID --json``."""

    job: Job


class StoreInfoOutput(StoreManifest):
    """``arpipe store info --json``: the store's manifest with what its shard indexes say."""

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="raised when a field changes meaning")
    samples: int = Field(ge=0, description="samples in the store, counted in the shard indexes")
    shapes: list[list[int]] = Field(description="the distinct token-grid shapes")
    shape_counts: list[tuple[list[int], int]] = Field(description="[shape, samples] pairs, most common first")
    modality_counts: list[tuple[str, int]] = Field(description="[modality, samples] pairs, most common first")


class GcItem(BaseModel):
    """One thing `arpipe gc` collects: a superseded stage folder, a finished stage's checkpoints, a stale lock."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    what: Literal["superseded", "checkpoints", "stale-lock"] = Field(
        description="superseded: a stage folder of an earlier fingerprint; checkpoints: the trainer's checkpoints "
                    "a finished stage keeps; stale-lock: a lock whose holder is gone")
    path: str = Field(description="the folder or file (local path or s3:// URI)")
    bytes: int = Field(ge=0, description="its size, counted when gc listed it")
    reason: str = Field(description="why it can go")
    state: Literal["listed", "removed", "skipped"] = Field(
        description="listed: a dry run (no --yes); removed; skipped: in use by then (see note)")
    note: str | None = Field(None, description="why --yes left it")


class GcKept(BaseModel):
    """Something `arpipe gc` would otherwise have collected, and why it stays."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    path: str = Field(description="the stage folder (or the stage's folder of folders)")
    reason: str


class GcOutput(_Output):
    """``arpipe gc --json``: what storage holds that the pipelines no longer reach, listed or removed."""

    pipelines: list[str] = Field(description="the pipeline files, as resolved")
    dry_run: bool = Field(description="true without --yes: nothing was removed")
    items: list[GcItem] = Field(description="what gc collects, stage by stage")
    kept: list[GcKept] = Field(description="superseded folders kept, and why (in use, --keep-last, ...)")
    bytes: int = Field(ge=0, description="the size of every item: what --yes frees")
    freed: int = Field(ge=0, description="bytes removed by this call (0 in a dry run)")


#: command -> its output model: the checked-in schemas (schemas/cli/<file>.schema.json) and docs/cli.md
OUTPUTS: dict[str, type[BaseModel]] = {
    "validate": ValidateOutput,
    "plan": PlanOutput,
    "status": StatusOutput,
    "jobs list": JobsOutput,
    "jobs status": JobOutput,
    "store info": StoreInfoOutput,
    "gc": GcOutput,
}


def schema_file_name(command: str) -> str:
    return command.replace(" ", "-") + ".schema.json"
