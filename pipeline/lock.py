"""One writer per stage output: an exclusive lock file with stale-lock detection.

The lock is created with create-if-absent (O_EXCL locally, ``If-None-Match: *``
on S3). A holder refreshes its heartbeat; a lock is stale when its process is
gone (same host) or its heartbeat is older than ``STALE_AFTER_S``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import psutil

from arpipe.pipeline.storage import control_uri, storage_for

STALE_AFTER_S = 90.0
HEARTBEAT_S = 15.0


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
        """Take the lock; return None on success, else the live holder."""
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
