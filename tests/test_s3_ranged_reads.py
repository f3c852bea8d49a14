"""A user tokenizes volumes and a video kept on S3: a unit transfers its region, not the whole file.

Reads go through a relay in front of the suite's S3 server (SeaweedFS) that counts the response body
bytes it serves (tests/s3proxy.py's CountingProxy): what a unit costs is measured on the wire, whatever
library made the requests. Counted: every response body while one unit is read (``reader.read(unit)``,
after the listing): metadata (zarr.json, HDF5 superblock, object headers and B-tree nodes, TIFF header
and IFDs, MRC and .npy headers), the 404 bodies of zarr's probes for metadata files, and the data.
Not counted: response headers (HEAD answers are headers only). A unit's samples are the ones its local
copy gives, digests included.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import uuid

import av
import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr
from nilearn.datasets import load_mni152_template
from s3proxy import CountingProxy
from s3server import ACCESS_KEY, SECRET_KEY

from arpipe.pipeline.storage import storage_for
from arpipe.stages.modalities import SampleError, VideoReader, VolumeReader

CROP = 32
#: units of 32 x 64 x 64 float32 voxels: a few per z row of crops, each a region smaller than the volume's rows
UNIT_BYTES = CROP * 64 * 64 * 4
WIDTH = 95   # the template's x side


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """The 2 mm MNI152 template, (99, 117, 95) float32: a real 3-D MRI volume shipped offline."""
    return load_mni152_template(resolution=2).get_fdata().astype(np.float32)


def _write_video(path, frames: int = 360, side: int = 96) -> None:
    """A 15 s, 24 fps mp4 of fresh noise every frame: each frame costs bytes, as in a real video."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def local(tmp_path_factory, mni):
    root = tmp_path_factory.mktemp("ranged")
    arr = zarr.create_array(str(root / "mni.zarr"), shape=mni.shape, dtype=mni.dtype, chunks=(16, 32, 32))
    arr[:] = mni
    group = zarr.open_group(str(root / "group"), mode="w")   # a Zarr group (as OME-Zarr), found by its zarr.json
    group.create_array("raw", shape=mni.shape, dtype=mni.dtype, chunks=(16, 32, 32))[:] = mni
    with h5py.File(root / "mni.h5", "w") as f:
        f.create_dataset("t1", data=mni, chunks=(16, 32, 32), compression="gzip")
    tifffile.imwrite(root / "mni.tif", mni, imagej=True)
    with mrcfile.new(root / "mni.mrc") as m:
        m.set_data(mni)
        m.voxel_size = 2.0
    np.save(root / "mni.npy", np.ascontiguousarray(mni))
    np.save(root / "fortran.npy", np.asfortranarray(mni))
    (root / "slices").mkdir()
    for z, plane in enumerate(mni):
        tifffile.imwrite(root / "slices" / f"slice_{z}.tif", plane, compression="zlib", tile=(32, 32))
    for name in ("mni.mrc", "mni.h5"):   # cut short, as by an upload that stopped
        data = (root / name).read_bytes()
        (root / f"cut-{name}").write_bytes(data[:len(data) // 2])
    _write_video(root / "walk.mp4")
    return root


@pytest.fixture(scope="module")
def remote(s3_server, local):
    """(bucket with the local files uploaded, the relay every read then goes through)."""
    proxy = CountingProxy(s3_server.endpoint, ACCESS_KEY, SECRET_KEY).start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        bucket = s3_server.make_bucket(f"ranged-{uuid.uuid4().hex[:8]}")
        storage = storage_for(bucket)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            storage.put_file(path, f"{bucket}/{path.relative_to(local).as_posix()}")
        for key, value in proxy.env.items():
            mp.setenv(key, value)
        yield bucket, proxy
    proxy.stop()


def _stored_region_bytes(path, unit) -> int:
    """The bytes the file stores for the unit's region: its compressed chunks (Zarr, HDF5), else its rows."""
    (z0, y0, _), (z1, y1, _) = unit.start, unit.stop
    if path.suffix == ".zarr":
        arr = zarr.open_array(str(path), mode="r")
        grid = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(unit.start, unit.stop, arr.chunks, strict=True)]
        chunks = [path / arr.metadata.encode_chunk_key(i) for i in itertools.product(*grid)]
        return sum(c.stat().st_size for c in chunks if c.exists())   # an all-fill chunk is not stored
    if path.suffix == ".h5":
        with h5py.File(path) as f:
            ds = f["t1"]
            grid = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(unit.start, unit.stop, ds.chunks, strict=True)]
            return sum(ds.id.get_chunk_info_by_coord(tuple(i * c for i, c in zip(idx, ds.chunks, strict=True))).size
                       for idx in itertools.product(*grid))
    return (z1 - z0) * (y1 - y0) * WIDTH * 4   # stored uncompressed (TIFF, MRC, .npy): whole rows of float32


def _off_centre(unit) -> float:
    return sum(((a + b) / 2 - n / 2) ** 2 for a, b, n in zip(unit.start, unit.stop, (99, 117, WIDTH), strict=True))


def _same_samples(got, want) -> None:
    assert [s.key for s in got] == [s.key for s in want] and got
    for a, b in zip(got, want, strict=True):
        assert a.source_digest == b.source_digest and np.array_equal(a.data, b.data) and a.meta == b.meta


@pytest.mark.parametrize("name", ["mni.zarr", "mni.h5", "mni.tif", "mni.mrc", "mni.npy"])
def test_a_volume_unit_transfers_at_most_twice_its_stored_region(remote, local, name):
    bucket, proxy = remote
    reader = VolumeReader(f"{bucket}/{name}", crop=CROP, stride=CROP, max_unit_bytes=UNIT_BYTES)
    units = reader.units()
    unit = min(units, key=_off_centre)   # inside the brain: chunks full of voxels, not background
    assert unit.stop[1] - unit.start[1] < 117 and len(units) > 8   # a region that is a part of the volume's rows and slices
    proxy.reset()
    got = list(reader.read(unit))
    transferred = proxy.bytes_served
    stored = _stored_region_bytes(local / name, unit)
    print(f"\n{name}: unit {unit.start}..{unit.stop}: {transferred} bytes in {proxy.requests} requests for "
          f"{stored} stored region bytes (ratio {transferred / stored:.2f}; the file is "
          f"{sum(p.stat().st_size for p in (local / name).rglob('*')) if name.endswith('zarr') else (local / name).stat().st_size})")
    assert transferred <= 2 * stored
    local_reader = VolumeReader(str(local / name), crop=CROP, stride=CROP, max_unit_bytes=UNIT_BYTES)
    assert [(u.start, u.stop) for u in local_reader.units()] == [(u.start, u.stop) for u in units]
    _same_samples(got, list(local_reader.read(next(u for u in local_reader.units() if u.start == unit.start))))


@pytest.mark.parametrize("name", ["slices", "fortran.npy", "group"])
def test_slices_arrays_and_groups_read_the_same_crops_as_their_local_copy(remote, local, name):
    """A folder of tiled, compressed slices (each slice file read for its tiles), a Fortran-ordered .npy
    (read by x slabs, its slowest axis) and a Zarr group whose one array is found by listing the group
    (one level, not its chunks): fewer bytes than their files, the same samples."""
    bucket, proxy = remote
    reader = VolumeReader(f"{bucket}/{name}", crop=CROP, stride=CROP, max_unit_bytes=UNIT_BYTES)
    assert reader.format == {"slices": "tiff_folder", "group": "zarr"}.get(name, "npy")
    units = reader.units()
    unit = min(units, key=_off_centre)
    proxy.reset()
    got = list(reader.read(unit))
    files = [local / "slices" / f"slice_{z}.tif" for z in range(unit.start[0], unit.stop[0])] if name == "slices" \
        else [p for p in (local / name).rglob("*") if p.is_file()] if name == "group" else [local / name]
    assert proxy.bytes_served < sum(f.stat().st_size for f in files)
    want = VolumeReader(str(local / name), crop=CROP, stride=CROP, max_unit_bytes=UNIT_BYTES)
    _same_samples(got, list(want.read(next(u for u in want.units() if u.start == unit.start))))


@pytest.mark.parametrize("name, what", [("cut-mni.mrc", "truncated"), ("cut-mni.h5", "cannot open hdf5 volume"),
                                        ("gone.npy", "does not exist")])
def test_a_truncated_or_missing_volume_on_s3_is_a_one_line_error(remote, name, what):
    bucket, _ = remote
    uri = f"{bucket}/{name}"
    with pytest.raises(SampleError) as err:
        VolumeReader(uri, crop=CROP).units()
    message = str(err.value)
    assert uri in message and what in message and "\n" not in message


def test_one_clip_of_a_video_on_s3_transfers_a_part_of_the_file(remote, local):
    bucket, proxy = remote
    size = (local / "walk.mp4").stat().st_size
    reader = VideoReader(f"{bucket}/walk.mp4", clip_len=8, size=32, clips_per_unit=1)
    units = reader.units()
    assert len(units) == 45 and {u.digest for u in units} == {
        "sha256:" + hashlib.sha256((local / "walk.mp4").read_bytes()).hexdigest()}
    proxy.reset()
    got = list(reader.read(units[2]))
    print(f"\nclip 2 of 45: {proxy.bytes_served} of the file's {size} bytes "
          f"({proxy.bytes_served / size:.2f}) in {proxy.requests} requests")
    assert proxy.bytes_served < size / 2
    want = VideoReader(str(local / "walk.mp4"), clip_len=8, size=32, clips_per_unit=1)
    local_units = want.units()
    assert [u.digest for u in local_units] == [None] * 45
    _same_samples(got, list(want.read(local_units[2])))
    assert math.isclose(got[0].meta["start_time"], 16 / 24, abs_tol=1e-6)
