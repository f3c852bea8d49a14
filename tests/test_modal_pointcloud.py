"""A user tokenizes point clouds sampled on the MNI152 brain surface, saved as PLY, XYZ, LAS and npy."""

from __future__ import annotations

import laspy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from nilearn.datasets import load_mni152_template
from plyfile import PlyData, PlyElement
from skimage.measure import marching_cubes

from arpipe.stages.modalities import (
    OctreeTokenizer,
    PointCloudReader,
    SampleError,
    TokenizerError,
    chamfer_distance,
    denormalize,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def brain_points() -> np.ndarray:
    """4000 points sampled uniformly (by area) on the brain isosurface, in mm, float32."""
    volume = load_mni152_template(resolution=2).get_fdata().astype(np.float32)
    verts, faces, _, _ = marching_cubes(volume, level=0.3, spacing=(2.0, 2.0, 2.0))
    tri = verts[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(faces), 4000, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random((4000, 1))), rng.random((4000, 1))
    pts = (1 - r1) * tri[pick, 0] + r1 * (1 - r2) * tri[pick, 1] + r1 * r2 * tri[pick, 2]
    return pts.astype(np.float32)


def write_ply(path, pts: np.ndarray, text: bool) -> None:
    vertex = np.array([tuple(p) for p in pts], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(vertex, "vertex")], text=text).write(str(path))


def write_las(path, pts: np.ndarray) -> None:
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales = np.array([1e-4] * 3)
    header.offsets = np.zeros(3)
    las = laspy.LasData(header)
    las.x, las.y, las.z = pts[:, 0], pts[:, 1], pts[:, 2]
    las.write(str(path))


@pytest.fixture(scope="module")
def cloud_folder(tmp_path_factory, brain_points):
    root = tmp_path_factory.mktemp("clouds")
    write_ply(root / "brain_binary.ply", brain_points, text=False)
    write_ply(root / "brain_ascii.ply", brain_points, text=True)
    np.savetxt(root / "brain.xyz", brain_points, fmt="%.9g", header="x y z")
    write_las(root / "brain.las", brain_points)
    np.save(root / "brain.npy", brain_points)
    np.savez(root / "brain_pair.npz", left=brain_points[brain_points[:, 0] < 90],
             right=brain_points[brain_points[:, 0] >= 90])
    return root


def test_every_format_gives_the_same_cloud_and_tokens(cloud_folder, brain_points):
    reader = PointCloudReader(str(cloud_folder))
    samples = {s.key: s for s in reader}
    assert sorted(samples) == ["brain.las", "brain.npy", "brain.xyz", "brain_ascii.ply", "brain_binary.ply",
                               "brain_pair.npz/left", "brain_pair.npz/right"]
    clouds = [samples[k] for k in ("brain_binary.ply", "brain_ascii.ply", "brain.xyz", "brain.las", "brain.npy")]
    ref = clouds[0]
    tok = OctreeTokenizer(depth=7)
    ref_tokens = tok.encode_one(ref.data)
    for s in clouds:
        assert s.shape == (4000, 3)
        assert np.abs(s.data - ref.data).max() < 1e-5, s.source_uri  # LAS stores 0.1 um integers
        assert np.array_equal(tok.encode_one(s.data), ref_tokens), s.source_uri
        assert np.allclose(denormalize(s.data, s.meta), brain_points, atol=2e-4)
    # normalization puts the cloud on the unit sphere and records how to undo it
    assert np.linalg.norm(ref.data, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    pair = [samples["brain_pair.npz/left"], samples["brain_pair.npz/right"]]
    assert sum(s.shape[0] for s in pair) == 4000 and all(s.source_uri.endswith(("#left", "#right")) for s in pair)


def test_octree_round_trip_on_the_brain(cloud_folder, brain_points, tmp_path):
    sample = next(iter(PointCloudReader(str(cloud_folder / "brain_binary.ply"))))
    tok = OctreeTokenizer(depth=6)
    tokens = tok.encode_arrays([sample.data])[0]
    bounds = tok.level_boundaries(tokens)
    assert bounds[:2] == [0, 1] and bounds[-1] == len(tokens) and len(bounds) == 7
    assert tok.positions(tokens).shape == (len(tokens), 4) and tok.layout()["axes"] == ["level", "x", "y", "z"]
    decoded = tok.decode_arrays([tokens])[0]
    in_mm = denormalize(decoded, sample.meta)
    # every point moved at most half a voxel diagonal; Chamfer is well below one voxel
    voxel_mm = tok.voxel_size * sample.meta["scale"]
    cd = chamfer_distance(in_mm, brain_points)
    print(f"\noctree depth 6 on the brain cloud: {len(tokens)} tokens, {len(decoded)} voxels, "
          f"Chamfer {cd:.3f} mm (voxel {voxel_mm:.2f} mm)")
    assert cd < 0.5 * voxel_mm
    tok.save(str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(again, OctreeTokenizer) and again.depth == 6 and again.tokens_per_sample is None
    assert np.array_equal(again.encode_one(sample.data), tokens)


coords = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32)


@settings(max_examples=80, deadline=None)
@given(xyz=arrays(np.float32, st.tuples(st.integers(1, 300), st.just(3)), elements=coords),
       depth=st.integers(1, 9))
def test_octree_is_exact_at_leaf_resolution(xyz, depth):
    tok = OctreeTokenizer(depth=depth)
    tokens = tok.encode_one(xyz)
    side = 1 << depth
    voxels = np.unique(np.clip(np.floor((xyz.astype(np.float64) + 1) / 2 * side), 0, side - 1).astype(np.int64), axis=0)
    decoded = tok.decode_one(tokens)
    got = np.unique(np.round((decoded.astype(np.float64) + 1) / 2 * side - 0.5).astype(np.int64), axis=0)
    assert np.array_equal(got, voxels)  # exactly the occupied leaf voxels, no more, no fewer
    assert np.array_equal(tok.encode_one(decoded), tokens)  # decoding is a fixed point
    assert tokens.min() >= 1 and tokens.max() <= 255
    assert tok.level_boundaries(tokens)[-1] == len(tokens)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad_value, what", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_non_finite_points(tmp_path, brain_points, bad_value, what):
    pts = brain_points[:100].copy()
    pts[7, 1] = bad_value
    np.save(tmp_path / "bad.npy", pts)
    with pytest.raises(SampleError, match="bad.npy: point cloud has 1 points with NaN or infinite coordinates"):
        list(PointCloudReader(str(tmp_path / "bad.npy")))


def test_empty_clouds(tmp_path):
    write_ply(tmp_path / "empty.ply", np.zeros((0, 3), np.float32), text=False)
    (tmp_path / "empty.xyz").write_text("# no points\n")
    for name in ("empty.ply", "empty.xyz"):
        with pytest.raises(SampleError, match="point cloud has no points; remove the empty file"):
            list(PointCloudReader(str(tmp_path / name)))


def test_cloud_over_the_size_limit_is_rejected_from_its_header(cloud_folder):
    for name in ("brain_binary.ply", "brain.las", "brain.npy", "brain.xyz"):
        with pytest.raises(SampleError, match="4000 points, over max_points=1000; raise max_points"):
            list(PointCloudReader(str(cloud_folder / name), max_points=1000))


def test_corrupt_ply_and_garbage_text(tmp_path, cloud_folder):
    blob = (cloud_folder / "brain_binary.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SampleError, match="cannot parse PLY"):
        list(PointCloudReader(str(tmp_path / "cut.ply")))
    (tmp_path / "words.xyz").write_text("one two three\n")
    with pytest.raises(SampleError, match="XYZ text is not numeric columns"):
        list(PointCloudReader(str(tmp_path / "words.xyz")))


def test_array_that_is_not_a_cloud(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(12, np.float32))
    with pytest.raises(SampleError, match=r"array of shape \(12,\) is not a point cloud"):
        list(PointCloudReader(str(tmp_path / "flat.npy")))


def test_octree_rejects_clouds_it_cannot_encode():
    tok = OctreeTokenizer(depth=4)
    with pytest.raises(TokenizerError, match="outside the octree cube"):
        tok.encode_one(np.array([[0.0, 0.0, 3.0]]))
    with pytest.raises(TokenizerError, match="empty point cloud"):
        tok.encode_one(np.zeros((0, 3)))
    with pytest.raises(TokenizerError, match="ends early"):
        tok.decode_one(np.array([255, 1]))
    with pytest.raises(TokenizerError, match=r"child masks in \[1, 255\]"):
        tok.decode_one(np.array([0]))
