"""Resumable units of a stage that builds a token store: unit records, reuse, bounded fan-out on Ray, the manifest.

A sharded stage (``tokenize`` by reader unit, ``sample`` by sample shard, any
later one) splits its work into units. A unit writes its token-store shard(s)
and any other files, then its :class:`UnitRecord` last, at
``<stage folder>/.arpipe/units/<name>.json``: in the control folder, because a
record is bookkeeping (it holds timings), not output. A rerun of the same
fingerprint reuses every unit whose record, shards and files are in place, so a
crash costs at most the units in flight::

    units = StoreUnits(out_uri=ctx.out_uri, store="store", fingerprint=ctx.fingerprint)
    records = {n: r for n in names if (r := units.reusable(n)) is not None}
    todo = [job for job in jobs if job.name not in records]
    for job, record in fan_out(todo, lambda job, slot: encode.remote(job), slots=workers):
        records[record.name] = record          # the worker wrote shards, files, then units.write(record)
    rejects = units.quarantine(ordered, "rejects.arrow")
    manifest = units.commit_store(ordered, vocab=..., known_files=ctx.known_files)

Shard and index file names come from :mod:`.format`; the commit is told their
checksums (``known_files``) so it need not download and rehash them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import CONTROL_DIR, join, storage_for
from arpipe.schemas.store import StoreManifest, TokenizerRef, VocabLayout

from .format import bin_name, index_name
from .quarantine import REJECTS_FILE, Reject, write_rejects

UNITS_DIR = (CONTROL_DIR, "units")   # the stage folder's control folder: never part of the output

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass(frozen=True)
class UnitRecord:
    """What one committed unit made: written after everything it names, so its presence means "done"."""

    name: str                                   # unique in the stage: "u000042" (tokenize), "image-0003" (sample)
    fingerprint: str                            # the stage's fingerprint: a record of other work is never reused
    shards: tuple[str, ...]                     # token-store shards it committed, in store order
    samples: int
    tokens: int
    rejects: tuple[Reject, ...] = ()
    files: dict[str, tuple[int, str]] = field(default_factory=dict)   # other files: relpath -> (bytes, digest)
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)   # what the stage kind keeps besides (JSON values)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        d = json.loads(text)
        return cls(name=d["name"], fingerprint=d["fingerprint"], shards=tuple(d["shards"]),
                   samples=int(d["samples"]), tokens=int(d["tokens"]),
                   rejects=tuple(Reject(**r) for r in d["rejects"]),
                   files={rel: (int(size), digest) for rel, (size, digest) in d["files"].items()},
                   seconds=float(d["seconds"]), detail=dict(d["detail"]))


@dataclass(frozen=True)
class StoreUnits:
    """The units that build one token store at ``store`` (relative) inside a stage's output folder ``out_uri``.

    Frozen and small: it travels to the workers, which write shards into
    :attr:`store_uri` and their record with :meth:`write`.
    """

    out_uri: str
    store: str                  # "" for units that build no token store (evaluate's decode and NLL chunks)
    fingerprint: str

    @property
    def store_uri(self) -> str:
        return join(self.out_uri, self.store)

    def record_uri(self, name: str) -> str:
        return join(self.out_uri, *UNITS_DIR, f"{name}.json")

    def side_file(self, name: str, suffix: str) -> str:
        """Relative path of bookkeeping a unit keeps beside its record (evaluate's decoded arrays): list it in
        the record's ``files`` so that :meth:`reusable` checks it is in place."""
        return "/".join((*UNITS_DIR, f"{name}{suffix}"))

    def write(self, record: UnitRecord) -> None:
        """Commit a unit: call it after its shards and files are written."""
        uri = self.record_uri(record.name)
        storage_for(uri).write_text(uri, record.to_json())

    def reusable(self, name: str) -> UnitRecord | None:
        """The unit's record, if this fingerprint committed it and every shard and file it names is in place."""
        from .writer import read_shard_info

        uri = self.record_uri(name)
        storage = storage_for(uri)
        try:
            record = UnitRecord.from_json(storage.read_text(uri))
        except (FileNotFoundError, ValueError, KeyError, TypeError):   # absent, or torn by a crash mid-write
            return None
        if record.name != name or record.fingerprint != self.fingerprint:
            return None
        try:
            for shard in record.shards:
                read_shard_info(self.store_uri, shard)   # a shard's sidecar is written at its commit
        except (UserError, ValueError):
            return None
        for rel, (size, _digest) in record.files.items():
            if storage.size(join(self.out_uri, rel)) != size:
                return None
        return record

    def quarantine(self, records: Iterable[UnitRecord], filename: str = REJECTS_FILE,
                   skipped: Sequence[Reject] = ()) -> list[Reject]:
        """Every unit's rejects, in unit order, written to ``filename`` in the stage folder (empty when none)
        after the ``skipped`` files' rows (:meth:`Reject.skipped`); returns the rejects alone."""
        rejects = [r for record in records for r in record.rejects]
        write_rejects(join(self.out_uri, filename), [*skipped, *rejects])
        return rejects

    def commit_store(self, records: Iterable[UnitRecord], *, vocab: VocabLayout | int,
                     tokenizer: TokenizerRef | None = None, metadata: dict[str, Any] | None = None,
                     known_files: dict[str, tuple[int, str]]) -> StoreManifest:
        """Write the store's manifest over the units' shards (in the order given) and tell the stage's commit
        the checksums of every shard, index and unit file (``known_files``: relpath -> (bytes, digest))."""
        from .writer import read_shard_info, write_manifest

        records = list(records)
        infos = [read_shard_info(self.store_uri, shard) for record in records for shard in record.shards]
        manifest = write_manifest(self.store_uri, infos, vocab=vocab, tokenizer=tokenizer, metadata=metadata)
        for info in infos:   # the commit need not download and rehash what the writers checksummed
            algo = info.checksum_algorithm
            known_files[join(self.store, bin_name(info.name))] = (info.bytes, f"{algo}:{info.checksum}")
            known_files[join(self.store, index_name(info.name))] = (info.index_bytes,
                                                                    f"{algo}:{info.index_checksum}")
        for record in records:
            known_files.update(record.files)
        return manifest


def fan_out(jobs: Iterable[Job], submit: Callable[[Job, int], Any], slots: int,
            ready: Sequence[Any] | None = None) -> Iterator[tuple[Job, Result]]:
    """Run ``jobs`` on Ray with at most ``slots`` in flight; yield ``(job, result)`` as each finishes.

    ``submit(job, slot)`` starts one job and returns its ``ObjectRef``; ``slot`` (``0..slots-1``) is free
    for that job alone, so a pool of actors takes ``actors[slot].method.remote(job)`` and plain tasks
    ignore it. Bounded in flight means bounded memory and bounded loss: whatever the number of jobs, a
    crash costs at most ``slots`` units. A failed job raises here, after Ray's own retries.

    ``ready`` (one ``ObjectRef`` per slot: each actor's ``__ray_ready__.remote()``) keeps a slot unused until
    its ref resolves, so a pool larger than the cluster can place now (two actors of one GPU each on a
    one-GPU node) works on the actors it has, where a job handed to an actor that never starts would wait
    for good. An actor that fails to start raises here.
    """
    import ray

    pending = list(jobs)
    pending.reverse()   # pop() from the end takes jobs in their given order
    starting: dict[Any, int] = {} if ready is None else {ref: slot for slot, ref in enumerate(ready)}
    free = list(range(max(1, slots))) if ready is None else []
    in_flight: dict[Any, tuple[Job, int]] = {}
    while pending or in_flight:
        while pending and free:
            slot = free.pop(0)
            job = pending.pop()
            in_flight[submit(job, slot)] = (job, slot)
        done, _ = ray.wait([*in_flight, *starting], num_returns=1)
        for ref in done:
            if ref in starting:
                ray.get(ref)
                free.append(starting.pop(ref))
                continue
            job, slot = in_flight.pop(ref)
            free.append(slot)
            yield job, ray.get(ref)
