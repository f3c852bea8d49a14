"""Train checkpoints that prove they are whole: a marker per rank, written last, checked before any resume.

A checkpoint is every rank's ``engine.save_checkpoint`` folder, merged by Ray Train into one
``checkpoint_<time>/`` under the run's storage (local, or S3 through pyarrow). Each rank adds
``arpipe-checkpoint-<rank>.json`` to its part once everything else is written: the size and digest
(``sha256:<hex>``) of each of its files, the step and the number of ranks. Ray Train commits a
checkpoint (lists it in its checkpoint manager's snapshot) only after every rank's upload returned,
but a committed checkpoint can still be damaged afterwards: a shard truncated, a file or a marker
deleted. :func:`restore` therefore checks the checkpoint Ray Train hands over before DeepSpeed reads
it and, when it is damaged, walks back through the older committed ones (``num_to_keep`` of them are
kept) to the newest whole one, or starts from scratch; every rank takes the same decision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arpipe.pipeline.digest import digest_file

MARKER = "arpipe-checkpoint-{rank}.json"
MARKER_FORMAT = 1


def _is_marker(name: str) -> bool:
    return name.startswith("arpipe-checkpoint-") and name.endswith(".json")


def write_marker(folder: Path, *, rank: int, world: int, step: int) -> None:
    """Record this rank's part of the checkpoint in ``folder``; call it after every other file is written."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if not _is_marker(rel):
                files[rel] = {"bytes": path.stat().st_size, "digest": digest_file(str(path))}
    record = {"format": MARKER_FORMAT, "step": step, "rank": rank, "world": world, "files": dict(sorted(files.items()))}
    (folder / MARKER.format(rank=rank)).write_text(json.dumps(record, indent=1))


def damage(folder: Path) -> str | None:
    """None when the checkpoint in ``folder`` is whole; else what is wrong with it, in a few words."""
    found = sorted(p.name for p in folder.iterdir() if _is_marker(p.name)) if folder.is_dir() else []
    if not found:
        return f"its marker {MARKER.format(rank=0)} is missing"
    records: dict[str, dict[str, Any]] = {}
    for name in found:
        try:
            records[name] = json.loads((folder / name).read_text())
            world = int(records[name]["world"])
        except (ValueError, KeyError, TypeError):
            return f"its marker {name} does not parse"
    missing = [MARKER.format(rank=r) for r in range(world) if MARKER.format(rank=r) not in records]
    if missing:
        return f"its marker {missing[0]} is missing"
    for record in records.values():
        for rel, info in record["files"].items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            size = path.stat().st_size
            if size != info["bytes"]:
                what = "truncated" if size < info["bytes"] else "longer than written"
                return f"{rel} is {what}: {size} of {info['bytes']} bytes"
            if digest_file(str(path)) != info["digest"]:
                return f"{rel} does not match its digest"
    return None


@dataclass
class Restored:
    """What :func:`restore` found: the loaded checkpoint's client state (None: start from scratch), and each
    damaged checkpoint it skipped as ``(step, what is wrong)``, newest first."""

    client_state: dict[str, Any] | None
    skipped: list[tuple[int | None, str]]

    def lines(self, stage: str) -> list[str]:
        """What the log says about the skipped checkpoints (one line each)."""
        if self.client_state is not None:
            then = f": resuming from step {int(self.client_state['step'])}"
        else:
            then = "; no earlier checkpoint is whole: training starts again from step 0"
        return [f"[{stage}] checkpoint step {'?' if step is None else step} is damaged ({what}){then}"
                for step, what in self.skipped]


def _committed(handed) -> list[tuple[int | None, Any]]:
    """The checkpoint Ray Train handed over, then the older committed ones it still keeps, newest first."""
    import ray.train

    try:
        reported = ray.train.get_all_reported_checkpoints(timeout_s=60)   # answers at once at a start
    except Exception:   # an older Ray without the call: only the handed checkpoint is known
        reported = []
    steps = {r.checkpoint.path: r.metrics.get("step") for r in reported}
    others = sorted(((s, r.checkpoint) for r in reported if (s := steps[r.checkpoint.path]) is not None
                     and r.checkpoint.path != handed.path), key=lambda item: -int(item[0]))
    return [(steps.get(handed.path), handed), *others]


def _agreed(whole: bool, world: int) -> bool:
    """True when the checkpoint is whole on every rank (each checks its own copy; S3 copies are downloaded)."""
    if world == 1:
        return whole
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if whole else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def restore(engine, handed, *, world: int, also: Callable[[Path], None] | None = None) -> Restored:
    """Load the newest whole committed checkpoint, from ``handed`` (``ray.train.get_checkpoint()``) back;
    ``also`` then reads this rank's own files (the EMA) from the same checkpoint folder."""
    if handed is None:
        return Restored(None, [])
    skipped: list[tuple[int | None, str]] = []
    for step, checkpoint in _committed(handed):
        with checkpoint.as_directory() as folder:
            problem = damage(Path(folder))
            if _agreed(problem is None, world):
                tag = (Path(folder) / "latest").read_text().strip()
                _path, client = engine.load_checkpoint(folder, tag=tag)
                if also is not None:
                    also(Path(folder))
                return Restored(client, skipped)
        skipped.append((step, problem or "damaged in another rank's copy"))
    return Restored(None, skipped)
