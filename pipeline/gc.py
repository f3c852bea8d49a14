"""``arpipe gc``: what storage holds that the given pipelines no longer reach, listed, then removed.

Three kinds of things go (each a :class:`~arpipe.schemas.cli.GcItem` with its path, reason and bytes):

- **superseded**: a folder ``<storage>/<stage>/<fingerprint[:16]>/`` of one of the pipelines' stages that is
  not the stage's current fingerprint folder (as ``arpipe plan`` computes it), committed or interrupted.
  ``keep_last=N`` keeps the N most recently finished of them per stage (``finished`` in their
  ``outputs.json``; interrupted ones, which never finished, count as the oldest);
- **checkpoints**: the Ray Train runs (a folder holding Ray Train's ``checkpoint_manager_snapshot.json``) in the
  control area of a folder whose outputs verify: a finished trainer's resume points (the train stage keeps its
  last two, a vqvae tokenizer's fit its own), which a finished stage never reads again;
- **stale-lock**: a lock whose holder is gone, by the lock module's own test (:meth:`LockInfo.alive`).

Never collected: a stage's current folder (its interrupted work and its checkpoints are its resume point
until it finishes); a folder with a live lock; every folder the last run of any pipeline on the same storage
recorded in its ledger (a running run's inputs, an interrupted run's resume point, what another pipeline
with a stage of the same name uses); the folders of a stage whose fingerprint is not known yet (an upstream
is not built). A live lock whose run left no ledger there keeps everything on that storage: what it reads
is unknown. :func:`plan_gc` only reads; :func:`apply_gc` removes each item while holding its folder's lock,
so a run that starts meanwhile waits for it, and one that holds the lock by then makes gc skip the item.
"""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from arpipe.pipeline import outputs as out
from arpipe.pipeline.config import LoadedPipeline
from arpipe.pipeline.dag import Graph
from arpipe.pipeline.fingerprint import explain_change
from arpipe.pipeline.ledger import read_ledger
from arpipe.pipeline.lock import StageLock, read_lock
from arpipe.pipeline.plan import Planner
from arpipe.pipeline.storage import CONTROL_DIR, control_uri, is_s3, join, storage_for
from arpipe.schemas.cli import GcItem, GcKept
from arpipe.schemas.outputs import OutputsRecord

#: the file Ray Train keeps beside a run's checkpoints (the train stage sets a torn one aside as ``.torn``)
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
LOCK = f"{CONTROL_DIR}/lock"


@dataclass
class GcPlan:
    """What :func:`plan_gc` found: the items to remove and what it keeps that is not current."""

    items: list[GcItem] = field(default_factory=list)
    kept: list[GcKept] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.items)


@dataclass
class _Stage:
    """One ``<storage>/<stage>/`` folder as the given pipelines see it."""

    root: str
    name: str
    current: dict[str, dict] = field(default_factory=dict)   # current folder -> its fingerprint document
    finished: set[str] = field(default_factory=set)          # current folders whose outputs verify
    unknown: str | None = None                                # why the current fingerprint is not known

    @property
    def uri(self) -> str:
        return out.stage_dir(self.root, self.name)


@dataclass
class _Folder:
    uri: str
    files: dict[str, int]                                     # relpath -> bytes
    record: OutputsRecord | None = None

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def current_stages(pipelines: Sequence[tuple[LoadedPipeline, Graph]]) -> dict[tuple[str, str], _Stage]:
    """(storage root, stage) -> its current fingerprint folder(s), computed as `arpipe plan` does."""
    stages: dict[tuple[str, str], _Stage] = {}
    for loaded, graph in pipelines:
        planner = Planner(loaded, graph)
        records: dict[str, OutputsRecord] = {}
        for name in graph.order:
            plan = planner.decide(name, records)
            stage = stages.setdefault((planner.root, name), _Stage(planner.root, name))
            if plan.out_uri is None:
                stage.unknown = f"its fingerprint is known once {plan.why.removeprefix('after ')} is built"
                continue
            stage.current[plan.out_uri] = plan.doc or {}
            if plan.action == "cached":
                records[name] = plan.record
                stage.finished.add(plan.out_uri)
    return stages


def plan_gc(pipelines: Sequence[tuple[LoadedPipeline, Graph]], keep_last: int = 0) -> GcPlan:
    """What ``arpipe gc`` would remove for these pipelines (see the module docstring for the rules)."""
    stages = current_stages(pipelines)
    result = GcPlan()
    for root in sorted({root for root, _ in stages}):
        here = {stage.uri: stage for (r, _), stage in sorted(stages.items()) if r == root}
        folders = {uri: _folders(uri) for uri in here}
        use = _in_use(root, folders)
        for uri, stage in here.items():
            _collect(stage, folders[uri], use, keep_last, result)
    return result


@dataclass
class _InUse:
    """What runs use on one storage root."""

    why: dict[str, str]                 # folder -> why it is kept (a ledger names it, a live lock holds it)
    live: set[str]                      # folders with a live lock
    everything: str | None = None       # why nothing on this storage may go


def _folders(stage_uri: str) -> dict[str, _Folder]:
    """The fingerprint folders under a stage's folder and their files (``latest.json`` beside them is none)."""
    files: dict[str, dict[str, int]] = defaultdict(dict)
    for entry in storage_for(stage_uri).list(stage_uri):
        folder, _, rel = entry.relpath.partition("/")
        if rel:
            files[folder][rel] = entry.size
    return {join(stage_uri, name): _Folder(join(stage_uri, name), found) for name, found in sorted(files.items())}


def _ledgers(root: str) -> Iterable[tuple[str, dict]]:
    """(pipeline name, its last run's ledger) for every pipeline that ran on this storage."""
    folder = control_uri(root, "ledger")
    for entry in storage_for(folder).list(folder):
        name = entry.relpath.removesuffix(".json")
        if "/" not in name and name != entry.relpath and (ledger := read_ledger(root, name)) is not None:
            yield name, ledger


def _in_use(root: str, folders: dict[str, dict[str, _Folder]]) -> _InUse:
    use = _InUse({}, set())
    runs: set[str] = set()
    for pipeline, ledger in _ledgers(root):
        runs.add(ledger.get("run_id", ""))
        for entry in ledger.get("stages", {}).values():
            if entry.get("out_uri"):
                use.why.setdefault(entry["out_uri"], f"the last run of pipeline {pipeline!r} "
                                                     f"({ledger.get('state', 'unknown')}) used it")
    for stage_folders in folders.values():
        for uri, folder in stage_folders.items():
            holder = read_lock(uri) if LOCK in folder.files else None
            if holder is None or not holder.alive():
                continue
            use.live.add(uri)
            use.why[uri] = f"locked by {holder.describe()}"
            if holder.run_id not in runs:
                use.everything = (f"{holder.describe()} holds a lock on {uri} and left no ledger on this "
                                  "storage, so what it reads is unknown: rerun gc once it ends")
    return use


def _collect(stage: _Stage, folders: dict[str, _Folder], use: _InUse, keep_last: int, result: GcPlan) -> None:
    superseded: list[_Folder] = []
    for uri, folder in folders.items():
        if uri in stage.current:
            if uri in stage.finished and uri not in use.live:
                _checkpoints(stage.name, folder, result)
            continue
        kept = use.everything or use.why.get(uri) or stage.unknown
        if kept:
            result.kept.append(GcKept(stage=stage.name, path=uri, reason=kept))
            _checkpoints_if_finished(stage.name, folder, use, result)
            continue
        folder.record = _record(uri)
        superseded.append(folder)
    # the most recently finished first; interrupted work never finished
    superseded.sort(key=lambda f: f.record.finished if f.record else float("-inf"), reverse=True)
    for folder in superseded[:keep_last]:
        result.kept.append(GcKept(stage=stage.name, path=folder.uri,
                                  reason=f"one of the {keep_last} most recent superseded (--keep-last)"))
        _checkpoints_if_finished(stage.name, folder, use, result)
    for folder in superseded[keep_last:]:
        result.items.append(GcItem(stage=stage.name, what="superseded", path=folder.uri, bytes=folder.bytes,
                                   reason=_why_superseded(folder, stage), state="listed"))
    gone = {folder.uri for folder in superseded[keep_last:]}   # a stale lock there goes with its folder
    for uri, folder in folders.items():
        if LOCK in folder.files and uri not in use.live and uri not in gone:
            holder = read_lock(uri)
            reason = f"stale lock of {holder.describe()}" if holder else "unreadable lock"
            result.items.append(GcItem(stage=stage.name, what="stale-lock", path=join(uri, LOCK),
                                       bytes=folder.files[LOCK], reason=reason, state="listed"))


def _record(uri: str) -> OutputsRecord | None:
    try:
        return OutputsRecord.model_validate_json(storage_for(uri).read_text(join(uri, out.OUTPUTS_FILE)))
    except (FileNotFoundError, ValidationError):
        return None


def _why_superseded(folder: _Folder, stage: _Stage) -> str:
    if folder.record is None:
        return "interrupted work of an earlier fingerprint"
    return "superseded: " + explain_change(folder.record.fingerprint_doc, next(iter(stage.current.values())))


def _checkpoints_if_finished(stage: str, folder: _Folder, use: _InUse, result: GcPlan) -> None:
    """A kept folder's checkpoints go when no run holds it and its outputs verify."""
    if use.everything or folder.uri in use.live or not any(_is_ray_run(rel) for rel in folder.files):
        return
    if out.inspect(folder.uri).state == "committed":
        _checkpoints(stage, folder, result)


def _is_ray_run(relpath: str) -> bool:
    head, _, name = relpath.rpartition("/")
    return head.startswith(f"{CONTROL_DIR}/") and name in (RAY_TRAIN_SNAPSHOT, RAY_TRAIN_SNAPSHOT + ".torn")


def _checkpoints(stage: str, folder: _Folder, result: GcPlan) -> None:
    for run in sorted({rel.rpartition("/")[0] for rel in folder.files if _is_ray_run(rel)}):
        size = sum(n for rel, n in folder.files.items() if rel.startswith(run + "/"))
        result.items.append(GcItem(stage=stage, what="checkpoints", path=join(folder.uri, run), bytes=size,
                                   reason="checkpoints of a finished stage (its outputs are committed)",
                                   state="listed"))


def apply_gc(plan: GcPlan) -> GcPlan:
    """Remove every item, each under its folder's lock; the plan again, each item ``removed`` or ``skipped``."""
    run_id = f"gc-{uuid.uuid4().hex[:12]}"
    done: list[GcItem] = []
    for item in plan.items:
        folder = item.path.split(f"/{CONTROL_DIR}/", 1)[0]
        lock = StageLock(folder, run_id)
        holder = lock.try_acquire()   # a stale lock is taken over here: that is the stale-lock item's removal
        if holder is not None:
            done.append(item.model_copy(update={"state": "skipped", "note": f"in use by {holder.describe()}"}))
            continue
        # a run that began since the listing (an older config's run, say) may have taken the folder as cached
        # input: such a run's ledger names it; look again now, under the folder's lock
        if item.what == "superseded" and (user := _ledger_naming(folder)) is not None:
            lock.release()
            done.append(item.model_copy(update={"state": "skipped", "note": f"in use: {user}"}))
            continue
        try:
            if item.what == "superseded":
                _empty_but_lock(folder)
            elif item.what == "checkpoints":
                storage_for(item.path).delete_prefix(item.path)
        finally:
            lock.release()
        if item.what == "superseded" and not is_s3(folder):
            _remove_empty(folder)
        done.append(item.model_copy(update={"state": "removed"}))
    return GcPlan(done, plan.kept)


def _ledger_naming(folder: str) -> str | None:
    """Which pipeline's last run (per the ledgers on the folder's storage root) names ``folder``, if one does."""
    root = folder.rsplit("/", 2)[0]
    for pipeline, ledger in _ledgers(root):
        if any(entry.get("out_uri") == folder for entry in ledger.get("stages", {}).values()):
            return f"the last run of pipeline {pipeline!r} ({ledger.get('state', 'unknown')}) uses it"
    return None


def _empty_but_lock(folder: str) -> None:
    """Everything in ``folder`` but the lock gc holds, the commit first: a half-emptied folder is never trusted."""
    storage = storage_for(folder)
    storage.delete(join(folder, out.OUTPUTS_FILE))
    files, trees = set(), set()
    for entry in storage.list(folder):
        if entry.relpath == LOCK:
            continue
        parts = entry.relpath.split("/")
        top = "/".join(parts[:2] if parts[0] == CONTROL_DIR else parts[:1])
        (files if top == entry.relpath else trees).add(top)
    for rel in sorted(files):
        storage.delete(join(folder, rel))
    for rel in sorted(trees):
        storage.delete_prefix(join(folder, rel))


def _remove_empty(folder: str) -> None:
    """The local folder's empty directories, bottom up (a run that took the lock since keeps its own)."""
    for path in (control_uri(folder), folder):
        try:
            os.rmdir(path)
        except OSError:
            pass


def size_text(n: int) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    scaled, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if scaled < 1024 or unit == "TiB":
            break
        scaled /= 1024
    return f"{n} B" if unit == "B" else f"{scaled:.1f} {unit}"


def gc_table(plan: GcPlan) -> list[list[str]]:
    """The rows `arpipe gc` prints: each item (with why --yes skipped one), then each folder kept and why."""
    rows = [[i.stage, i.what if i.state != "skipped" else f"{i.what} (skipped: {i.note})", size_text(i.bytes),
             i.path, i.reason] for i in plan.items]
    return rows + [[k.stage, "kept", "-", k.path, k.reason] for k in plan.kept]
