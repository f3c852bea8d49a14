"""A user tokenizes the MNI152 brain template stored as MRC, TIFF, HDF5, Zarr and .npy."""

from __future__ import annotations

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
import torch
import zarr
from nilearn.datasets import load_mni152_template

from arpipe.stages.modalities import VQVAE, MultiScaleVQ, PatchVQ, SampleError, VolumeReader, psnr, ssim

CROP = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Torch on one thread: these tensors are small, and two threads crawl when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """The 2 mm MNI152 template, (99, 117, 95) float32 in [0, 1]: a real 3-D MRI volume shipped offline."""
    return load_mni152_template(resolution=2).get_fdata().astype(np.float32)


@pytest.fixture(scope="module")
def volume_files(tmp_path_factory, mni):
    root = tmp_path_factory.mktemp("mni")
    with mrcfile.new(root / "mni.mrc") as m:
        m.set_data(mni)
        m.voxel_size = 2.0
    tifffile.imwrite(root / "mni.tif", mni, imagej=True, resolution=(0.5, 0.5), metadata={"spacing": 2.0})
    with h5py.File(root / "mni.h5", "w") as f:
        ds = f.create_dataset("brain/t1", data=mni, chunks=(16, 16, 16), compression="gzip")
        ds.attrs["element_size_um"] = [2.0, 2.0, 2.0]
    arr = zarr.create_array(str(root / "mni.zarr"), shape=mni.shape, dtype=mni.dtype, chunks=(16, 32, 32))
    arr[:] = mni
    arr.attrs["voxel_size"] = [2.0, 2.0, 2.0]
    np.save(root / "mni.npy", mni)
    (root / "slices").mkdir()
    for z, plane in enumerate(mni):
        tifffile.imwrite(root / "slices" / f"slice_{z}.tif", plane)  # natural order: slice_2 before slice_10
    return root


FORMATS = ["mni.mrc", "mni.tif", "mni.h5", "mni.zarr", "mni.npy", "slices"]


def test_every_format_gives_the_same_crops_and_tokens(volume_files, mni):
    readers = {name: VolumeReader(str(volume_files / name), crop=CROP, stride=CROP) for name in FORMATS}
    samples = {name: list(r) for name, r in readers.items()}
    ref = samples["mni.mrc"]
    assert len(ref) == 4 * 4 * 3  # cover: 99 -> origins 0, 32, 64, 67
    assert ref[0].shape == (1, CROP, CROP, CROP)
    last = ref[-1].meta["origin"]
    assert last == [99 - CROP, 117 - CROP, 95 - CROP]
    assert np.array_equal(ref[-1].data[0], mni[-CROP:, -CROP:, -CROP:])

    tok = PatchVQ(input_shape=(1, CROP, CROP, CROP), patch=(4, 4, 4), codebook_size=64, modality="volume")
    tok.fit([s.data for s in ref])
    tokens = {name: np.stack(tok.encode_arrays([s.data for s in ss])) for name, ss in samples.items()}
    for name in FORMATS:
        assert [s.key.split("/", 1)[1] for s in samples[name]] == [s.key.split("/", 1)[1] for s in ref]
        assert [s.source_digest for s in samples[name]] == [s.source_digest for s in ref], name
        assert np.array_equal(tokens[name], tokens["mni.mrc"]), name
    for name in ("mni.mrc", "mni.tif", "mni.h5", "mni.zarr"):
        assert samples[name][0].meta["voxel_size"] == [2.0, 2.0, 2.0], name
    assert samples["mni.npy"][0].meta["voxel_size"] is None
    recon = torch.from_numpy(np.stack(tok.decode_arrays(list(tokens["mni.h5"]))))
    orig = torch.from_numpy(np.stack([s.data for s in ref]))
    quality = float(psnr(recon, orig).mean()), float(ssim(recon, orig).mean())
    print(f"\npatch_vq 4x4x4 K=64 on MNI152 crops: PSNR {quality[0]:.1f} dB, SSIM {quality[1]:.3f}")
    assert quality[0] > 22 and quality[1] > 0.6


def test_units_bound_memory_and_cover_the_same_crops(volume_files):
    path = str(volume_files / "mni.h5")
    big = VolumeReader(path, crop=24, stride=16)
    small = VolumeReader(path, crop=24, stride=16, max_unit_bytes=24 * 40 * 60 * 4)
    assert len(big.units()) == len(big._origins((99, 117, 95))[0])  # one unit per z row of crops
    units = small.units()
    assert len(units) > len(big.units())
    assert max(u.size for u in units) <= 24 * 40 * 60 * 4
    a = {s.key: s.source_digest for s in big}
    b = [(s.key, s.source_digest) for u in units for s in small.read(u)]
    assert len(b) == len(a) and dict(b) == a  # every crop exactly once, same voxels


def test_integer_volumes_and_intensity_window(tmp_path, mni):
    em = (mni * 255).astype(np.uint8)
    np.save(tmp_path / "em.npy", em)
    s = next(iter(VolumeReader(str(tmp_path / "em.npy"), crop=CROP)))
    assert s.data.dtype == np.float32 and np.allclose(s.data[0], em[:CROP, :CROP, :CROP] / 255)
    w = next(iter(VolumeReader(str(tmp_path / "em.npy"), crop=CROP, intensity_range=(50, 150))))
    assert w.data.min() == 0.0 and w.data.max() == 1.0


def test_msvq_and_vqvae_take_3d_crops(volume_files):
    crops = np.stack([s.data for s in VolumeReader(str(volume_files / "mni.npy"), crop=16, stride=16)])[:64]
    ms = MultiScaleVQ(input_shape=(1, 16, 16, 16), patch=(2, 2, 2), scales=[1, 2, 4, 8], codebook_size=32,
                      modality="volume", fit_iters=20).fit(crops)
    idx = ms.encode(torch.from_numpy(crops))
    assert idx.shape == (64, 1 + 8 + 64 + 512) and ms.layout()["boundaries"] == [0, 1, 9, 73, 585]
    assert ms.positions()[-1].tolist() == [3, 7, 7, 7]
    vq = VQVAE(input_shape=(1, 16, 16, 16), downsample=4, codebook_size=16, hidden=8, code_dim=4,
               modality="volume").fit(crops, steps=3, batch_size=8)
    assert vq.encode(torch.from_numpy(crops[:2])).shape == (2, 64)
    assert vq.decode(vq.encode(torch.from_numpy(crops[:2]))).shape == (2, 1, 16, 16, 16)


# ---------------------------------------------------------------- bad input


def test_volume_of_the_wrong_rank(tmp_path, mni):
    tifffile.imwrite(tmp_path / "plane.tif", mni[50])
    with pytest.raises(SampleError, match=r"expected a 3-D volume \(z, y, x\), got shape \(117, 95\)"):
        VolumeReader(str(tmp_path / "plane.tif"), crop=16).units()
    with h5py.File(tmp_path / "rgb.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SampleError, match=r"got shape \(4, 8, 8, 3\)"):
        VolumeReader(str(tmp_path / "rgb.h5"), crop=4).units()


def test_crop_larger_than_the_volume(volume_files):
    with pytest.raises(SampleError, match=r"smaller than the crop \(128, 128, 128\); lower crop"):
        VolumeReader(str(volume_files / "mni.mrc"), crop=128).units()


def test_nan_voxels(tmp_path, mni):
    bad = mni.copy()
    bad[5, 5, 5] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(SampleError, match=r"nan.npy#z0_y0_x0: crop has 1 NaN or infinite voxels"):
        list(VolumeReader(str(tmp_path / "nan.npy"), crop=CROP))


def test_volume_over_the_size_limit(volume_files):
    with pytest.raises(SampleError, match="over max_voxels=100000; raise max_voxels"):
        VolumeReader(str(volume_files / "mni.zarr"), crop=16, max_voxels=100_000).units()


def test_ambiguous_hdf5_needs_a_dataset_name(tmp_path):
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f.create_dataset("raw", data=np.zeros((8, 8, 8), np.uint8))
        f.create_dataset("labels", data=np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(SampleError, match="holds datasets .*set dataset"):
        VolumeReader(str(tmp_path / "two.h5"), crop=4).units()
    assert len(list(VolumeReader(str(tmp_path / "two.h5"), dataset="raw", crop=4))) == 8


def test_corrupt_mrc(tmp_path, volume_files):
    blob = (volume_files / "mni.mrc").read_bytes()
    (tmp_path / "cut.mrc").write_bytes(blob[:5000])
    with pytest.raises(SampleError, match="cannot open mrc volume"):
        VolumeReader(str(tmp_path / "cut.mrc"), crop=16).units()


def test_unknown_format(tmp_path):
    (tmp_path / "brain.nii").write_bytes(b"")
    with pytest.raises(SampleError, match="cannot tell the volume format"):
        VolumeReader(str(tmp_path / "brain.nii"))
