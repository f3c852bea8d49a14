"""S3 volume unit read (issue 22): bytes a unit transfers / the bytes its region is stored in, side by side
with the download a unit made before (the whole Zarr store copied to a temporary folder, then read).

The volume is nilearn's 1 mm MNI152 template (197 x 233 x 189 float32, a real MRI volume shipped
offline, 35 MB raw) written as a Zarr 3 array in 64^3 chunks (zstd, zarr's default codec) and
uploaded to a local SeaweedFS S3 server. Reads go through a relay that counts the response body bytes
it serves (tests/s3proxy.py): bytes on the wire, metadata and 404 probes included, headers not.
One unit of the tokenize stage's plan (crop 64, units of at most ``--unit-mib``), the one nearest the
volume's centre, is read both ways; the region's bytes are its stored (compressed) chunks. Results go to
``benchmarks/results/s3_volume_read.json``; the ratio lines come last.

    .venv/bin/python benchmarks/s3_volume_read.py [--unit-mib 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "tests"))  # the S3 test server and the counting relay

CROP = 64


def stored_bytes(local: Path, unit) -> int:
    """The bytes of the chunks the unit's region covers, as stored (compressed)."""
    import zarr

    arr = zarr.open_array(str(local), mode="r")
    grid = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(unit.start, unit.stop, arr.chunks, strict=True)]
    files = [local / arr.metadata.encode_chunk_key(i) for i in itertools.product(*grid)]
    return sum(f.stat().st_size for f in files if f.exists())


def _off_centre(unit, shape) -> float:
    return sum(((a + b) / 2 - n / 2) ** 2 for a, b, n in zip(unit.start, unit.stop, shape, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unit-mib", type=float, default=4.0, help="the reader's max_unit_bytes, in MiB")
    args = ap.parse_args()

    import zarr
    from nilearn.datasets import load_mni152_template
    from s3proxy import CountingProxy
    from s3server import ACCESS_KEY, SECRET_KEY, S3Server

    from arpipe.pipeline.storage import join, storage_for
    from arpipe.stages.modalities import VolumeReader

    work = Path(tempfile.mkdtemp(prefix="arpipe-bench-s3vol-"))
    server = S3Server(work / "s3").start()
    proxy = CountingProxy(server.endpoint, ACCESS_KEY, SECRET_KEY).start()
    try:
        os.environ.update(server.env)
        volume = np.ascontiguousarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
        local = work / "mni1mm.zarr"
        arr = zarr.create_array(str(local), shape=volume.shape, dtype=volume.dtype, chunks=(CROP,) * 3)
        arr[:] = volume
        stored_total = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        bucket = server.make_bucket("bench-volume")
        uri = f"{bucket}/mni1mm.zarr"
        storage = storage_for(bucket)
        for p in sorted(local.rglob("*")):
            if p.is_file():
                storage.put_file(p, join(uri, p.relative_to(local).as_posix()))
        os.environ.update(proxy.env)   # every read from here on goes through the counting relay

        options = dict(crop=CROP, stride=CROP, max_unit_bytes=int(args.unit_mib * 2**20))
        reader = VolumeReader(uri, **options)
        units = reader.units()
        unit = min(units, key=lambda u: _off_centre(u, volume.shape))   # the brain, not the background
        region_raw = math.prod(b - a for a, b in zip(unit.start, unit.stop, strict=True)) * 4
        region_stored = stored_bytes(local, unit)

        # before: the unit copied the whole store to a temporary folder (sources.local_tree), then read it
        proxy.reset()
        t = time.perf_counter()
        copy = Path(tempfile.mkdtemp(prefix="arpipe-src-", dir=work))
        s3 = storage_for(uri)
        for entry in s3.list(uri):
            s3.get_file(join(uri, entry.relpath), copy / entry.relpath)
        old = list(VolumeReader(str(copy), format="zarr", **options).read(unit))
        old_s, old_bytes, old_requests = time.perf_counter() - t, proxy.bytes_served, proxy.requests
        shutil.rmtree(copy)

        # now: the unit reads its chunks by GETs through the Zarr store over pipeline.storage
        proxy.reset()
        t = time.perf_counter()
        new = list(reader.read(unit))
        new_s, new_bytes, new_requests = time.perf_counter() - t, proxy.bytes_served, proxy.requests
        assert [s.source_digest for s in new] == [s.source_digest for s in old] and new
    finally:
        proxy.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "volume": f"MNI152 1 mm, {volume.shape} float32, zarr 3 chunks {CROP}^3 (zstd), {stored_total} bytes stored",
        "unit": {"start": list(unit.start), "stop": list(unit.stop), "crops": len(new), "of_units": len(units)},
        "region_raw_bytes": region_raw,
        "region_stored_bytes": region_stored,
        "download": {"bytes": old_bytes, "requests": old_requests, "seconds": old_s},
        "ranged": {"bytes": new_bytes, "requests": new_requests, "seconds": new_s},
        "ratios": {
            "download bytes / region stored bytes": old_bytes / region_stored,
            "ranged bytes / region raw bytes": new_bytes / region_raw,
            "ranged bytes / region stored bytes (goal <= 2)": new_bytes / region_stored,
        },
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "s3_volume_read.json").write_text(json.dumps(results, indent=2))
    print(f"volume: {results['volume']}")
    print(f"unit {unit.start}..{unit.stop} ({len(new)} crops, 1 of {len(units)} units): region "
          f"{region_raw} bytes raw, {region_stored} bytes stored")
    print(f"{'read':<34}{'bytes':>12}{'requests':>10}{'seconds':>10}")
    print(f"{'download whole store, then read':<34}{old_bytes:>12}{old_requests:>10}{old_s:>10.2f}")
    print(f"{'ranged reads of the region':<34}{new_bytes:>12}{new_requests:>10}{new_s:>10.2f}")
    for name, value in results["ratios"].items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
