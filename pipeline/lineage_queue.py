"""Pending lineage records: what a run leaves for MLflow, and the detached writer that delivers them.

A run in which no stage ran does not wait for MLflow: it keeps its :class:`RunRecord` under
``<storage>/.arpipe/lineage/pending/`` and starts ``python -m arpipe.pipeline.lineage_queue ROOT``
in its own session. A record is deleted only once MLflow has all of it (a note of its run ids goes
to ``delivered/``), so a writer that dies loses nothing: ``arpipe run``, ``plan`` and ``status``
hand leftovers to a new writer. The MLflow writing itself is :class:`Lineage`'s, in lineage.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arpipe.pipeline.lineage import Lineage, RunRecord, file_lock, tracking_uri
from arpipe.pipeline.storage import control_uri, is_s3, join, storage_for


def lineage_dir(root: str, *parts: str) -> str:
    """``<storage>/.arpipe/lineage/...``: pending records, delivery notes, the writer's log."""
    return control_uri(root, "lineage", *parts)


def queue(root: str, record: RunRecord) -> str:
    """Keep ``record`` under the storage root until it is in MLflow; returns where."""
    uri = lineage_dir(root, "pending", f"{record.record_id}.json")
    storage_for(uri).write_text(uri, record.model_dump_json(), durable=True)
    return uri


def pending(root: str) -> list[str]:
    """Records not yet (completely) in MLflow, oldest first by name."""
    folder = lineage_dir(root, "pending")
    if not is_s3(folder) and not os.path.isdir(folder):
        return []   # the common case, without touching storage's machinery
    return sorted(join(folder, e.relpath) for e in storage_for(folder).list(folder) if e.relpath.endswith(".json"))


def delivered(root: str, record_id: str) -> dict[str, str] | None:
    """The MLflow run ids a delivered record got: ``{"": parent, stage: run_id}``; None if still pending."""
    uri = lineage_dir(root, "delivered", f"{record_id}.json")
    try:
        return json.loads(storage_for(uri).read_text(uri))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def deliver_pending(root: str, fallback_uri: str | None = None) -> dict[str, dict[str, str]]:
    """Deliver every pending record under ``root``; returns their run ids by record id.

    One process at a time per record (a lock on this machine); MLflow's own record of what it has
    makes a second delivery of the same record complete the first rather than repeat it.
    """
    done: dict[str, dict[str, str]] = {}
    writers: dict[tuple[str, str], Lineage] = {}
    for uri in pending(root):
        record_id = uri.rsplit("/", 1)[-1].removesuffix(".json")
        lock = Path(tempfile.gettempdir()) / f"arpipe-lineage-{record_id}.lock"
        with file_lock(str(lock)):
            storage = storage_for(uri)
            try:
                record = RunRecord.model_validate_json(storage.read_text(uri))
            except FileNotFoundError:
                continue   # another writer delivered it while this one waited
            where = tracking_uri(record.tracking_uri or fallback_uri)
            key = (where, record.experiment)
            if key not in writers:
                writers[key] = Lineage(where, record.experiment)
            ids = writers[key].deliver(record)
            note = lineage_dir(root, "delivered", f"{record_id}.json")
            storage_for(note).write_text(note, json.dumps(ids), durable=False)
            storage.delete(uri)
            done[record_id] = ids
        lock.unlink(missing_ok=True)   # a writer still waiting on it finds the record gone and moves on
    return done


def deliver_in_background(root: str) -> None:
    """Start a detached writer for ``root``'s pending records; returns at once.

    The writer outlives this command (its own session, no inherited pipes), so a caller that reads
    this process's output to its end is not held up by it. Its errors go to ``writer.log`` beside
    the records; whatever it could not deliver stays pending for the next command.
    """
    log = subprocess.DEVNULL
    if not is_s3(root):
        os.makedirs(lineage_dir(root), exist_ok=True)
        log = open(lineage_dir(root, "writer.log"), "ab")   # noqa: SIM115  (handed to the child)
    try:
        subprocess.Popen([sys.executable, "-m", "arpipe.pipeline.lineage_queue", root], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True, close_fds=True)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


def deliver_if_pending(root: str) -> bool:
    """What every command that knows a pipeline does first: hand leftover records to a writer."""
    if pending(root):
        deliver_in_background(root)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    """The detached writer: ``python -m arpipe.pipeline.lineage_queue STORAGE_ROOT``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m arpipe.pipeline.lineage_queue STORAGE_ROOT", file=sys.stderr)
        return 2
    try:
        deliver_pending(argv[0])
    except Exception as err:   # left pending: the next arpipe command tries again
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} lineage delivery failed: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
