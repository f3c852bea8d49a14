"""The store's quarantine: samples a stage could not read, encode or decode, with the reason (``rejects.arrow``).

A bad sample never stops a whole stage by itself: it is set aside here and the
stage decides (``max_reject_fraction``) whether too many were. The file is an
Arrow IPC table with one row per sample: source, reason, stage, time.

Files a reader does not read at all (other formats, hidden files, label
sidecars) get a row too, so that every file of a source is accounted for: their
reason starts with ``skipped:`` (:data:`SKIPPED`) and they never count as rejects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from arpipe.pipeline.storage import storage_for

REJECTS_FILE = "rejects.arrow"   # in the stage's output folder, beside its token store
SKIPPED = "skipped: "            # the reason's prefix on rows of files skipped, not rejected


@dataclass(frozen=True)
class Reject:
    """One quarantined sample: where it came from (a file, ``file#key``, or a sample's seed), and why."""

    source: str
    reason: str
    stage: str
    time: float

    @classmethod
    def skipped(cls, source: str, reason: str, stage: str, time: float) -> Reject:
        """The row of a file the reader skipped (``reason`` says why, and how to have it read)."""
        return cls(source=source, reason=SKIPPED + reason, stage=stage, time=time)

    @property
    def is_skip(self) -> bool:
        """A skipped file's row, not a rejected sample: ``max_reject_fraction`` does not count it."""
        return self.reason.startswith(SKIPPED)


def write_rejects(uri: str, rejects: Sequence[Reject]) -> None:
    """Quarantined samples as an Arrow IPC file at ``uri`` (an empty table when there are none)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.table({
        "source": pa.array([r.source for r in rejects], pa.string()),
        "reason": pa.array([r.reason for r in rejects], pa.string()),
        "stage": pa.array([r.stage for r in rejects], pa.string()),
        "time": pa.array([r.time for r in rejects], pa.float64()),
    })
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    storage_for(uri).write_bytes(uri, sink.getvalue().to_pybytes())
