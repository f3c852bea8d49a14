"""The run ledger: the last run's state of every stage, for ``arpipe status``.

``<storage>/.arpipe/ledger/<pipeline>.json``, rewritten atomically at each
stage transition. Outputs themselves are trusted only through their
``outputs.json``; the ledger adds what storage alone cannot tell (cache hit or
ran, failed, running, when, which MLflow run). A run whose lineage went to a background writer
(nothing ran) names its record; its MLflow run ids come from the writer's delivery note.
"""

from __future__ import annotations

import json
import time
from typing import Any

from arpipe.pipeline.storage import control_uri, storage_for


def ledger_uri(root: str, pipeline: str) -> str:
    return control_uri(root, "ledger", f"{pipeline}.json")


class Ledger:
    def __init__(self, root: str, pipeline: str, run_id: str, parent_run_id: str | None):
        self.uri = ledger_uri(root, pipeline)
        self.data: dict[str, Any] = {"run_id": run_id, "mlflow_parent_run_id": parent_run_id,
                                     "started": time.time(), "finished": None, "state": "running", "stages": {}}

    def stage(self, name: str, **fields: Any) -> None:
        entry = self.data["stages"].setdefault(name, {})
        entry.update(fields)
        self.save()

    def finish(self, state: str) -> None:
        self.data["state"] = state
        self.data["finished"] = time.time()
        self.save()

    def save(self) -> None:
        try:
            storage_for(self.uri).write_text(self.uri, json.dumps(self.data, indent=1), durable=False)
        except OSError:
            pass   # bookkeeping only: a full or failing storage must not stop the run it describes


def read_ledger(root: str, pipeline: str) -> dict[str, Any] | None:
    """The last run's ledger, with the MLflow run ids its lineage got once a background writer delivered it."""
    uri = ledger_uri(root, pipeline)
    try:
        data = json.loads(storage_for(uri).read_text(uri))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if data.get("lineage_record") and not data.get("mlflow_parent_run_id"):
        from arpipe.pipeline.lineage_queue import delivered

        ids = delivered(root, data["lineage_record"]) or {}
        data["mlflow_parent_run_id"] = ids.pop("", None)
        for name, run_id in ids.items():
            entry = data["stages"].get(name)
            if entry is not None and not entry.get("mlflow_run_id"):
                entry["mlflow_run_id"] = run_id
    return data
