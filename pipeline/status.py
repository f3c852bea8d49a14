"""``arpipe status``: each stage's state from storage, locks and the run ledger."""

from __future__ import annotations

import json

from arpipe.pipeline.config import LoadedPipeline
from arpipe.pipeline.dag import Graph
from arpipe.pipeline.ledger import read_ledger
from arpipe.pipeline.lineage_queue import deliver_if_pending
from arpipe.pipeline.lock import read_lock
from arpipe.pipeline.plan import Planner
from arpipe.pipeline.storage import control_uri, storage_for
from arpipe.schemas.cli import StageState
from arpipe.schemas.outputs import OutputsRecord


def stage_status(loaded: LoadedPipeline, graph: Graph) -> list[StageState]:
    """One row per stage: done / cached / running / failed / pending, with fingerprint, duration, run, output."""
    planner = Planner(loaded, graph)
    deliver_if_pending(planner.root)   # lineage an earlier run's background writer did not deliver
    ledger = read_ledger(planner.root, loaded.spec.name) or {"stages": {}}
    records: dict[str, OutputsRecord] = {}
    rows = []
    for name in graph.order:
        plan = planner.decide(name, records)
        entry = ledger["stages"].get(name, {})
        row = StageState(stage=name, kind=plan.kind, state="pending", fingerprint=plan.fingerprint, duration_s=None,
                         mlflow_run_id=None, output=plan.out_uri, note=None)
        if plan.action == "cached":
            records[name] = plan.record
            cached = entry.get("state") == "cached" and entry.get("fingerprint") == plan.fingerprint
            row.state, row.duration_s = ("cached" if cached else "done"), plan.record.duration_s
            row.mlflow_run_id = (entry.get("mlflow_run_id") if cached else plan.record.mlflow_run_id) or None
        elif plan.out_uri:
            holder = read_lock(plan.out_uri)
            failed = _failure(plan.out_uri)
            if holder is not None and holder.alive():
                row.state, row.mlflow_run_id = "running", entry.get("mlflow_run_id")
            elif failed:
                row.state, row.mlflow_run_id, row.note = "failed", entry.get("mlflow_run_id"), failed
            elif plan.action == "resume":
                row.note = "interrupted work will resume"
        rows.append(row)
    return rows


def status_table(rows: list[StageState]) -> list[list[str]]:
    """The rows `arpipe status` prints: missing values as "-", a note beside the output."""
    return [[r.stage, r.state, (r.fingerprint or "-")[:12],
             "-" if r.duration_s is None else f"{r.duration_s:.1f} s", r.mlflow_run_id or "-",
             (r.output or "-") + (f"  ({r.note})" if r.note else "")] for r in rows]


def _failure(out_uri: str) -> str | None:
    uri = control_uri(out_uri, "failed.json")
    try:
        return json.loads(storage_for(uri).read_text(uri)).get("error", "failed")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
