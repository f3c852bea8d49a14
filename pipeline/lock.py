"""One writer per stage output: an exclusive lock file with stale-lock detection.

The lock is created with create-if-absent (O_EXCL locally, ``If-None-Match: *``
on S3). A holder refreshes its heartbeat; a lock is stale when its process is
gone (same host) or its heartbeat is older than ``STALE_AFTER_S``.

Some S3-compatible stores ignore ``If-None-Match``: there every create succeeds and
two runs would both hold a lock. Before the first lock on a store (endpoint, bucket)
:func:`check_exclusive_creates` asks the server itself, and refuses to lock there.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import psutil

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import S3Storage, Storage, control_uri, is_s3, storage_for

STALE_AFTER_S = 90.0
HEARTBEAT_S = 15.0
#: ``ARPIPE_S3_SINGLE_WRITER=1``: the user vouches that one run at a time writes this storage, so a store
#: that ignores conditional writes may hold locks anyway (they then only inform, they do not exclude)
SINGLE_WRITER_ENV = "ARPIPE_S3_SINGLE_WRITER"
#: probes that must each see their second create refused; more than one, so one odd answer cannot decide
PROBES = 2

_verdicts: dict[tuple[str, str], bool] = {}   # (endpoint, bucket) -> honours If-None-Match
_verdicts_mutex = threading.Lock()


def lock_uri(out_uri: str) -> str:
    return control_uri(out_uri, "lock")


@dataclass
class LockInfo:
    host: str
    pid: int
    run_id: str
    heartbeat: float

    def alive(self) -> bool:
        if self.host == socket.gethostname():
            try:
                # a reused pid belongs to a process born after the holder last beat
                return psutil.Process(self.pid).create_time() <= self.heartbeat + 1
            except psutil.Error:
                return False
        return time.time() - self.heartbeat < STALE_AFTER_S

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host})"


def single_writer() -> bool:
    return os.environ.get(SINGLE_WRITER_ENV, "").lower() in ("1", "true", "yes")


def check_exclusive_creates(uri: str) -> None:
    """Refuse (UserError) to lock under ``uri`` when its store would let two runs create the same lock.

    Local folders need no check (O_EXCL). On S3 the server is asked once per process and
    (endpoint, bucket), with probe objects in the control area beside ``uri``.
    """
    if not is_s3(uri) or single_writer():
        return
    storage = storage_for(uri)
    assert isinstance(storage, S3Storage)
    bucket = uri[len("s3://"):].partition("/")[0]
    endpoint = storage.endpoint
    with _verdicts_mutex:
        honoured = _verdicts.get((endpoint, bucket))
        if honoured is None:
            honoured = _verdicts[(endpoint, bucket)] = _honours_if_none_match(storage, uri)
    if not honoured:
        raise UserError("this S3 store does not honour conditional writes (If-None-Match), so two runs could both "
                        "take a stage's lock and write the same output", where=f"s3://{bucket} at {endpoint}",
                        fix="use a store that honours them (AWS S3, MinIO, SeaweedFS), or, if only one run "
                            "at a time ever writes this storage, set ARPIPE_S3_SINGLE_WRITER=1")


def _honours_if_none_match(storage: Storage, uri: str) -> bool:
    """Create fresh probe objects twice each with If-None-Match: the store must refuse every second create."""
    seen: list[bool] = []
    for _ in range(2 * PROBES):
        if len(seen) == PROBES:
            break
        probe = control_uri(uri, f"probe-if-none-match-{uuid.uuid4().hex}")
        try:
            # a first create refused means a retried PUT met its own earlier success: ask again elsewhere
            if storage.create_exclusive(probe, b"arpipe probe: deleted at once"):
                seen.append(not storage.create_exclusive(probe, b"arpipe probe: second create"))
        except Exception as err:
            if _error_code(err) in ("NotImplemented", "501"):   # a store that rejects the header outright
                return False
            raise
        finally:
            storage.delete(probe)
    return bool(seen) and all(seen)


def _error_code(err: Exception) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


def read_lock(out_uri: str) -> LockInfo | None:
    try:
        data = json.loads(storage_for(out_uri).read_text(lock_uri(out_uri)))
        return LockInfo(**data)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


class StageLock:
    """Held while a stage runs; released after its commit (or failure)."""

    def __init__(self, out_uri: str, run_id: str):
        self.out_uri = out_uri
        self.uri = lock_uri(out_uri)
        self.run_id = run_id
        self.info = LockInfo(socket.gethostname(), os.getpid(), run_id, time.time())

    def try_acquire(self) -> LockInfo | None:
        """Take the lock; return None on success, else the live holder.

        Raises UserError when the store cannot make the lock exclusive (see check_exclusive_creates).
        """
        check_exclusive_creates(self.out_uri)
        if is_s3(self.uri) and single_writer():
            # creates cannot exclude on this store, but a live lock still turns away a run that starts later
            holder = read_lock(self.out_uri)
            if holder is not None and holder.alive():
                return holder
        storage = storage_for(self.uri)
        for _ in range(3):
            self.info.heartbeat = time.time()
            if storage.create_exclusive(self.uri, json.dumps(self.info.__dict__).encode()):
                return None
            holder = read_lock(self.out_uri)
            if holder is not None and holder.alive():
                return holder
            # stale (or unreadable): remove it only if it is still the same stale lock
            if read_lock(self.out_uri) == holder:
                storage.delete(self.uri)
        return read_lock(self.out_uri)

    def heartbeat(self) -> None:
        self.info.heartbeat = time.time()
        storage_for(self.uri).write_text(self.uri, json.dumps(self.info.__dict__), durable=False)

    def release(self) -> None:
        holder = read_lock(self.out_uri)
        if holder is None or (holder.pid == self.info.pid and holder.run_id == self.run_id):
            storage_for(self.uri).delete(self.uri)


class Heartbeats:
    """A daemon thread refreshing every held lock, so other hosts see them alive."""

    def __init__(self) -> None:
        self.locks: set[StageLock] = set()
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="arpipe-heartbeat", daemon=True)
        self._thread.start()

    def add(self, lock: StageLock) -> None:
        with self._mutex:
            self.locks.add(lock)

    def remove(self, lock: StageLock) -> None:
        with self._mutex:
            self.locks.discard(lock)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._mutex:
                held = list(self.locks)
            for lock in held:
                try:
                    lock.heartbeat()
                except Exception:
                    pass  # storage hiccup: the next beat retries; staleness needs STALE_AFTER_S of misses

    def stop(self) -> None:
        self._stop.set()
