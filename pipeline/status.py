"""``arpipe status``: each stage's state from storage, locks and the run ledger."""

from __future__ import annotations

import json
from typing import Any

from arpipe.pipeline.config import LoadedPipeline
from arpipe.pipeline.dag import Graph
from arpipe.pipeline.ledger import read_ledger
from arpipe.pipeline.lineage_queue import deliver_if_pending
from arpipe.pipeline.lock import read_lock
from arpipe.pipeline.plan import Planner
from arpipe.pipeline.storage import control_uri, storage_for
from arpipe.schemas.outputs import OutputsRecord


def stage_status(loaded: LoadedPipeline, graph: Graph) -> list[dict[str, Any]]:
    """One row per stage: done / cached / running / failed / pending, with fingerprint, duration, run, output."""
    planner = Planner(loaded, graph)
    deliver_if_pending(planner.root)   # lineage an earlier run's background writer did not deliver
    ledger = read_ledger(planner.root, loaded.spec.name) or {"stages": {}}
    records: dict[str, OutputsRecord] = {}
    rows = []
    for name in graph.order:
        plan = planner.decide(name, records)
        entry = ledger["stages"].get(name, {})
        row = {"stage": name, "state": "pending", "fingerprint": plan.fingerprint or "-", "duration": "-",
               "mlflow_run_id": "-", "output": plan.out_uri or "-"}
        if plan.action == "cached":
            records[name] = plan.record
            cached = entry.get("state") == "cached" and entry.get("fingerprint") == plan.fingerprint
            row.update(state="cached" if cached else "done", duration=f"{plan.record.duration_s:.1f} s",
                       mlflow_run_id=(entry.get("mlflow_run_id") if cached else plan.record.mlflow_run_id) or "-")
        elif plan.out_uri:
            holder = read_lock(plan.out_uri)
            failed = _failure(plan.out_uri)
            if holder is not None and holder.alive():
                row.update(state="running", mlflow_run_id=entry.get("mlflow_run_id", "-"))
            elif failed:
                row.update(state="failed", mlflow_run_id=entry.get("mlflow_run_id", "-"),
                           output=f"{plan.out_uri}  ({failed})")
            elif plan.action == "resume":
                row.update(state="pending", output=f"{plan.out_uri}  (interrupted work will resume)")
        rows.append(row)
    return rows


def _failure(out_uri: str) -> str | None:
    uri = control_uri(out_uri, "failed.json")
    try:
        return json.loads(storage_for(uri).read_text(uri)).get("error", "failed")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
