"""The store's quarantine: samples a stage could not read, encode or decode, with the reason (``rejects.arrow``).

A bad sample never stops a whole stage by itself: it is set aside here and the
stage decides (``max_reject_fraction``) whether too many were. The file is an
Arrow IPC table with one row per sample: source, reason, stage, time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from arpipe.pipeline.storage import storage_for

REJECTS_FILE = "rejects.arrow"   # in the stage's output folder, beside its token store


@dataclass(frozen=True)
class Reject:
    """One quarantined sample: where it came from (a file, ``file#key``, or a sample's seed), and why."""

    source: str
    reason: str
    stage: str
    time: float


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
