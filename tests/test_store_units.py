"""A sharded stage builds a token store in resumable units: a crash costs the units in flight, nothing more.

The story: a stage fans a dozen units out on Ray (at most two at a time), each writing a
shard, a side file and its record; the stage is cut off, restarted, and reuses exactly the
units that are committed whole; the manifest and the commit's known checksums name the
files the store format names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.ipc as ipc
import pytest
import xxhash

from arpipe.pipeline.digest import digest_bytes
from arpipe.stages.store import Reject, StoreUnits, TokenStore, UnitRecord, fan_out
from arpipe.stages.store.format import bin_name, index_name

FINGERPRINT = "a" * 64


def build_unit(units: StoreUnits, index: int) -> UnitRecord:
    """What a worker does: write a shard and a side file, then the record last."""
    from arpipe.stages.store import ShardWriter

    name = f"u{index:06d}"
    writer = ShardWriter(units.store_uri, f"{name}-000", vocab_size=64)
    for k in range(3):
        writer.append(np.full(4, index, dtype=np.int64), key=f"{name}/{k}", modality="image")
    writer.commit()
    side = Path(units.out_uri) / "media" / f"{name}.txt"
    side.parent.mkdir(parents=True, exist_ok=True)
    side.write_text(f"unit {index}")
    data = side.read_bytes()
    record = UnitRecord(name=name, fingerprint=units.fingerprint, shards=(f"{name}-000",), samples=3, tokens=12,
                        rejects=(Reject(source=f"{name}/bad.png", reason="truncated", stage="build",
                                        time=time.time()),) if index == 5 else (),
                        files={f"media/{name}.txt": (len(data), digest_bytes(data))},
                        detail={"index": index})
    units.write(record)
    return record


def test_a_restarted_stage_reuses_exactly_the_units_committed_whole(tmp_path):
    units = StoreUnits(out_uri=str(tmp_path / "out"), store="store", fingerprint=FINGERPRINT)
    names = [f"u{i:06d}" for i in range(6)]
    for i in range(4):       # the first run committed four units, then died
        build_unit(units, i)
    out = tmp_path / "out"
    # the record lives in the control folder (bookkeeping, not output), and round-trips as written
    record_file = out / ".arpipe" / "units" / "u000001.json"
    assert units.reusable("u000001") == UnitRecord.from_json(record_file.read_text())
    assert not list((out / "store").glob("**/*units*"))
    # damage: unit 2 lost its shard, unit 3 a side file was rewritten, unit 1 was torn mid-write
    for path in (out / "store").glob("shard-u000002-000*"):
        path.unlink()
    (out / "media" / "u000003.txt").write_text("different length")
    record_file.write_text(record_file.read_text()[:20])
    assert [n for n in names if units.reusable(n) is not None] == ["u000000"]

    # a record another configuration made in this folder is not this unit
    other = StoreUnits(out_uri=units.out_uri, store="store", fingerprint="b" * 64)
    assert other.reusable("u000000") is None

    records = {n: r for n in names if (r := units.reusable(n)) is not None}
    for i in range(1, 6):
        records[f"u{i:06d}"] = build_unit(units, i)
    ordered = [records[n] for n in names]
    known: dict[str, tuple[int, str]] = {}
    manifest = units.commit_store(ordered, vocab=64, metadata={"units": 6}, known_files=known)

    store = TokenStore.open(units.store_uri)
    assert len(store) == 18 and store.manifest.digest == manifest.digest
    assert [int(store.tokens(i)[0]) for i in range(0, 18, 3)] == list(range(6))   # unit order = store order
    # the commit is told every shard's, index's and side file's checksum, under the names the format owns
    for shard in store.shard_names:
        for rel in (f"store/{bin_name(shard)}", f"store/{index_name(shard)}"):
            size, digest = known[rel]
            data = (out / rel).read_bytes()
            assert size == len(data) and digest == f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}", rel
    for i in range(6):
        data = (out / "media" / f"u{i:06d}.txt").read_bytes()
        assert known[f"media/u{i:06d}.txt"] == (len(data), digest_bytes(data))

    rejects = units.quarantine(ordered)
    table = ipc.open_file(str(out / "rejects.arrow")).read_all().to_pylist()
    assert [r.source for r in rejects] == [t["source"] for t in table] == ["u000005/bad.png"]
    assert table[0]["reason"] == "truncated" and table[0]["stage"] == "build"


def test_a_record_names_what_it_holds_in_plain_json(tmp_path):
    """Someone debugging a resume reads the record with any JSON tool."""
    units = StoreUnits(out_uri=str(tmp_path), store="samples", fingerprint=FINGERPRINT)
    build_unit(units, 5)
    doc = json.loads((tmp_path / ".arpipe" / "units" / "u000005.json").read_text())
    assert doc["shards"] == ["u000005-000"] and doc["samples"] == 3 and doc["fingerprint"] == FINGERPRINT
    assert doc["rejects"][0]["reason"] == "truncated" and doc["detail"] == {"index": 5}


def test_fan_out_keeps_at_most_slots_in_flight_and_gives_each_its_own_slot(ray_cluster):
    import ray

    @ray.remote
    def square(x: int) -> int:
        time.sleep(0.05)
        return x * x

    in_flight: dict[int, int] = {}   # slot -> job
    most = 0

    def submit(job: int, slot: int):
        nonlocal most
        assert slot not in in_flight, f"slot {slot} given to job {job} while job {in_flight.get(slot)} holds it"
        in_flight[slot] = job
        most = max(most, len(in_flight))
        return square.remote(job)

    results = {}
    for job, result in fan_out(range(12), submit, slots=3):
        slot = next(s for s, j in in_flight.items() if j == job)
        del in_flight[slot]
        results[job] = result
    assert results == {x: x * x for x in range(12)}
    assert most == 3


def test_fan_out_raises_a_failed_job(ray_cluster):
    import ray

    @ray.remote(max_retries=0)
    def fail(x: int) -> int:
        raise ValueError(f"unit {x} is broken")

    with pytest.raises(ray.exceptions.RayTaskError, match="unit 0 is broken"):
        list(fan_out([0], lambda job, _slot: fail.remote(job), slots=2))
