"""Callable of examples/point_clouds.yaml: point clouds on the MNI152 brain's surfaces, as binary PLY files.

No package ships a point cloud data set that loads offline without a large download, so the clouds are
sampled from a real shape: the iso-surfaces of nilearn's MNI152 brain template (marching cubes at five
intensity levels, from the outer surface inwards), as a scanner would sample it. Training and held-out
clouds are different random points on the same surfaces.
"""

from __future__ import annotations

import os

import numpy as np


def export_clouds(config, inputs, out_dir):
    """``train/*.ply`` and ``heldout/*.ply`` under ``out_dir``; returns both folders."""
    from nilearn.datasets import load_mni152_template
    from skimage.measure import marching_cubes

    volume = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)   # (x, y, z)
    volume = (volume - volume.min()) / max(float(volume.max() - volume.min()), 1e-9)
    surfaces = [marching_cubes(volume, level=float(level))[0] for level in np.linspace(0.2, 0.6, 5)]
    points = int(config.get("points", 1024))
    rng = np.random.default_rng(int(config.get("seed", 0)))
    folders = {}
    for split, count in (("train", int(config.get("clouds", 200))), ("heldout", int(config.get("heldout", 20)))):
        folders[split] = os.path.join(out_dir, split)
        os.makedirs(folders[split], exist_ok=True)
        for k in range(count):
            verts = surfaces[k % len(surfaces)]
            xyz = verts[rng.choice(len(verts), size=points, replace=False)]
            write_ply(os.path.join(folders[split], f"brain{k:03d}.ply"), xyz)
    return folders


def write_ply(path: str, xyz: np.ndarray) -> None:
    from plyfile import PlyData, PlyElement

    vertex = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    vertex["x"], vertex["y"], vertex["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(path)
