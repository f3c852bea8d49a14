"""Stage output folders: where they live, how they are committed and verified.

``<storage>/<stage>/<fingerprint[:16]>/`` holds what a stage wrote;
``outputs.json`` there (written last, atomically) is the commit. Control
files (lock, failure record) live in ``.arpipe/`` inside the folder and are
not part of the output. ``<storage>/<stage>/latest.json`` remembers the last
committed fingerprint document so that ``plan`` can say what changed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from arpipe.pipeline import __version__
from arpipe.pipeline.digest import digest_bytes, digest_json, digest_stream, hex_of
from arpipe.pipeline.stage import Output
from arpipe.pipeline.storage import CONTROL_DIR, is_s3, join, storage_for, user_cache
from arpipe.schemas.outputs import FileRecord, OutputsRecord, OutputValue

OUTPUTS_FILE = "outputs.json"
#: what a stage folder may hold besides its work: the lock of the run that holds it and a failure note
NOT_WORK = (f"{CONTROL_DIR}/lock", f"{CONTROL_DIR}/failed.json")
#: each run's console log of the stage (``arpipe run`` writes it): not work either
LOGS = f"{CONTROL_DIR}/logs/"


def is_work(relpath: str) -> bool:
    """Whether a file in a stage folder is work (an output, a checkpoint), not bookkeeping about it."""
    return relpath not in NOT_WORK and not relpath.startswith(LOGS)


def log_uri(out_uri: str, run_id: str) -> str:
    """Where run ``run_id`` keeps the log of the stage whose folder is ``out_uri``."""
    return join(out_uri, LOGS, f"{run_id}.log")


def stage_dir(storage_root: str, stage: str) -> str:
    return join(storage_root, stage)


def output_uri(storage_root: str, stage: str, fingerprint: str) -> str:
    return join(storage_root, stage, fingerprint[:16])


def staging_dir(out_uri: str) -> Path:
    """Local folder a stage writes into: the output folder itself when local, a cache folder for S3."""
    if not is_s3(out_uri):
        return Path(out_uri)
    base = Path(os.environ.get("ARPIPE_STAGING") or user_cache("staging"))
    return base / hex_of(digest_bytes(out_uri.encode()))[:24]


def _is_control(relpath: str) -> bool:
    return relpath == OUTPUTS_FILE or relpath.split("/", 1)[0] == CONTROL_DIR


def collect_files(out_uri: str, work_dir: Path, known: dict[str, tuple[int, str]]) -> dict[str, FileRecord]:
    """Hash every file the stage produced; for S3, upload staged files first."""
    files: dict[str, FileRecord] = {}
    storage = storage_for(out_uri)
    if is_s3(out_uri) and work_dir.exists():
        for dirpath, _dirs, names in os.walk(work_dir):
            for name in names:
                local = Path(dirpath) / name
                rel = local.relative_to(work_dir).as_posix()
                if _is_control(rel) or name.endswith(".tmp"):
                    continue
                with open(local, "rb") as f:
                    digest = digest_stream(f)
                storage.put_file(local, join(out_uri, rel))
                files[rel] = FileRecord(bytes=local.stat().st_size, digest=digest)
    for entry in storage.list(out_uri):
        rel = entry.relpath
        if _is_control(rel) or rel in files or (rel.rsplit("/", 1)[-1].startswith(".") and rel.endswith(".tmp")):
            continue
        if rel in known and known[rel][0] == entry.size:
            files[rel] = FileRecord(bytes=entry.size, digest=known[rel][1])
            continue
        with storage.open_read(join(out_uri, rel)) as stream:
            files[rel] = FileRecord(bytes=entry.size, digest=digest_stream(stream))
    return dict(sorted(files.items()))


def _output_value(name: str, out: Output, files: dict[str, FileRecord]) -> OutputValue:
    if out.path is None:
        try:
            json.dumps(out.value)
        except TypeError:
            raise TypeError(f"output {name!r} is a {type(out.value).__name__}, which is not JSON; "
                            "write it to a file in out_dir and return the path") from None
        return OutputValue(type="value", value=out.value, digest=out.digest or digest_json(out.value))
    rel = out.path.strip("/")
    if rel in files:
        return OutputValue(type="file", path=rel, digest=out.digest or files[rel].digest)
    inside = {k: v.digest for k, v in files.items() if k.startswith(rel + "/") or rel in ("", ".")}
    if not inside and rel not in ("", "."):
        raise FileNotFoundError(f"output {name!r} names {rel!r}, which the stage did not write")
    return OutputValue(type="dir", path=rel, digest=out.digest or digest_json(inside))


def record_digest(outputs: dict[str, OutputValue], files: dict[str, FileRecord]) -> str:
    return digest_json({"outputs": {k: v.model_dump() for k, v in outputs.items()},
                        "files": {k: v.model_dump() for k, v in files.items()}})


def commit(*, stage: str, kind: str, fingerprint: str, fingerprint_doc: dict, out_uri: str, work_dir: Path,
           outputs: dict[str, Output | Any], known_files: dict[str, tuple[int, str]], started: float,
           mlflow_run_id: str | None) -> OutputsRecord:
    """Hash (and for S3 upload) what the stage wrote, then write outputs.json last."""
    files = collect_files(out_uri, work_dir, known_files)
    values = {name: _output_value(name, out if isinstance(out, Output) else Output(value=out), files)
              for name, out in outputs.items()}
    record = OutputsRecord(
        stage=stage, kind=kind, fingerprint=fingerprint, fingerprint_doc=fingerprint_doc, outputs=values,
        files=files, digest=record_digest(values, files), mlflow_run_id=mlflow_run_id, started=started,
        finished=time.time(), host=socket.gethostname(), arpipe_version=__version__)
    storage = storage_for(out_uri)
    storage.write_text(join(out_uri, OUTPUTS_FILE), record.model_dump_json(indent=1))
    storage.write_text(join(out_uri.rsplit("/", 1)[0], "latest.json"),
                       json.dumps({"fingerprint": fingerprint, "fingerprint_doc": fingerprint_doc}), durable=False)
    return record


@dataclass
class Verdict:
    """What is on storage for one fingerprint."""

    state: str            # "committed", "missing" (nothing), "partial" (work, no commit), "corrupt"
    reason: str = ""
    record: OutputsRecord | None = None


def inspect(out_uri: str) -> Verdict:
    """Trust ``outputs.json`` only if it parses, its digest matches, and every file it names is there whole."""
    storage = storage_for(out_uri)
    try:
        text = storage.read_text(join(out_uri, OUTPUTS_FILE))
    except FileNotFoundError:
        # work an interrupted run left: outputs in progress, or resumable state such as checkpoints
        # under .arpipe/ (a lock or a failure note alone is not work)
        present = [e for e in storage.list(out_uri) if is_work(e.relpath)]
        return Verdict("partial" if present else "missing")
    try:
        record = OutputsRecord.model_validate_json(text)
    except ValidationError:
        return Verdict("corrupt", "outputs.json does not parse")
    if record_digest(record.outputs, record.files) != record.digest:
        return Verdict("corrupt", "outputs.json digest does not match its content")
    sizes = {e.relpath: e.size for e in storage.list(out_uri)}
    for rel, info in record.files.items():
        if rel not in sizes:
            return Verdict("corrupt", f"output missing: {rel}")
        if sizes[rel] != info.bytes:
            return Verdict("corrupt", f"output corrupt: {rel} has {sizes[rel]} bytes, expected {info.bytes}")
    for rel in _rehashed(record, out_uri):
        with open(storage.local_path(join(out_uri, rel)), "rb") as f:
            if digest_stream(f) != record.files[rel].digest:
                return Verdict("corrupt", f"output corrupt: {rel} does not match its recorded digest")
    return Verdict("committed", record=record)


def _rehashed(record: OutputsRecord, out_uri: str) -> list[str]:
    """Files the cache re-hashes besides checking sizes: those the producing kind names in ``rehash_outputs``
    (globs; a train stage's weights), on local storage (an S3 object is not rewritten in place unnoticed,
    and downloading it for every plan would cost more than the check is worth)."""
    if is_s3(out_uri):
        return []
    from arpipe.pipeline.registry import stage_class

    try:
        patterns = getattr(stage_class(record.kind), "rehash_outputs", ())
    except (KeyError, ImportError):
        return []
    return [rel for rel, info in record.files.items()
            if info.digest.startswith("sha256:") and any(fnmatch.fnmatchcase(rel, p) for p in patterns)]


def read_latest(storage_root: str, stage: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage_for(storage_root).read_text(join(storage_root, stage, "latest.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def resolve(record: OutputsRecord, out_uri: str, name: str) -> Any:
    """The value a ``${stage.name}`` reference stands for: a URI for file/dir outputs, else the value."""
    value = record.outputs[name]
    if value.type == "value":
        return value.value
    return join(out_uri, value.path) if value.path not in ("", ".") else out_uri
