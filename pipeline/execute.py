"""Running one stage where it was placed (a Ray worker or a driver thread) and committing it."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arpipe.pipeline import outputs as out
from arpipe.pipeline.lineage import StageLog
from arpipe.pipeline.registry import stage_class, stage_models
from arpipe.pipeline.stage import StageContext

#: the driver's environment for a stage task; stage kinds reach the same through StageContext
forwarded_env = StageContext.forwarded_env
with_env = StageContext.with_env


@dataclass(frozen=True)
class StagePayload:
    """What the runner sends to the task that runs one stage (a Ray task, or a driver thread for
    ``placement = "driver"`` kinds). Plain values only, so it pickles across the Ray boundary."""

    name: str
    kind: str
    #: the stage's config with ``${stage.output}`` references resolved; its kind's schema validates it again
    config: dict[str, Any]
    fingerprint: str
    #: the canonical document the fingerprint digests, recorded in ``outputs.json``
    fingerprint_doc: dict[str, Any]
    out_uri: str
    pipeline_dir: Path
    #: resolved upstream outputs by ``"stage.output"``: URIs, or JSON values a python stage returned
    inputs: dict[str, Any]
    tracking_uri: str | None
    mlflow_run_id: str | None
    code_digest: str | None
    #: the driver's AWS_/MLFLOW_/ARPIPE_ environment, set for the task (a shared cluster may predate it)
    env: dict[str, str]


@dataclass(frozen=True)
class StageResult:
    """What the task that ran a stage hands back: the committed ``outputs.json`` text, and what the stage logged
    for the driver to write to its MLflow run (stages on a Ray task do not open MLflow)."""

    outputs_json: str
    log: StageLog | None = None


def execute_stage(payload: StagePayload) -> StageResult:
    """Run a stage into its folder and commit it."""
    return with_env(payload.env, _execute, payload)


def _execute(payload: StagePayload) -> StageResult:
    started = time.time()
    kind = payload.kind
    spec = stage_models()[kind].model_validate(payload.config)
    out_uri = payload.out_uri
    work_dir = out.staging_dir(out_uri)
    work_dir.mkdir(parents=True, exist_ok=True)
    cls = stage_class(kind)
    ctx = StageContext(
        name=payload.name, kind=kind, fingerprint=payload.fingerprint, out_uri=out_uri, work_dir=work_dir,
        pipeline_dir=payload.pipeline_dir, inputs=payload.inputs, tracking_uri=payload.tracking_uri,
        mlflow_run_id=payload.mlflow_run_id, code_digest=payload.code_digest, defer_lineage=cls.placement == "task")
    stage = cls(spec, ctx)
    produced = stage.run()
    record = out.commit(
        stage=ctx.name, kind=kind, fingerprint=ctx.fingerprint, fingerprint_doc=payload.fingerprint_doc,
        out_uri=out_uri, work_dir=work_dir, outputs=produced, known_files=ctx.known_files, started=started,
        mlflow_run_id=ctx.mlflow_run_id)
    if work_dir != Path(out_uri):
        shutil.rmtree(work_dir, ignore_errors=True)   # S3 staging: everything is uploaded and committed
    return StageResult(record.model_dump_json(indent=1), ctx.deferred_log())
