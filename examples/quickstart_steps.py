"""Callables of examples/quickstart.yaml: real data that Python packages ship, written as the files users have.

- images: scikit-learn's 1797 handwritten digits, as PNGs in one folder per class;
- video: scikit-image's 24-frame GIF (``no_time_for_that_tiny.gif``);
- volume: nilearn's MNI152 brain template (a real 3-D MRI, standing in for an EM volume), as MRC;
- point clouds: points sampled on the MNI152 brain surface at several iso-levels, as binary PLY.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image


def export_data(config, inputs, out_dir):
    """Write the four datasets under ``out_dir``; returns their paths."""
    images, heldout = export_digits(os.path.join(out_dir, "images"), os.path.join(out_dir, "heldout"),
                                    heldout=int(config.get("heldout", 197)))
    video = os.path.join(out_dir, "video")
    os.makedirs(video, exist_ok=True)
    import skimage

    shutil.copy(os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif"), video)
    volume = _mni_volume(resolution=int(config.get("volume_resolution", 2)))
    mrc = os.path.join(out_dir, "volume", "mni152.mrc")
    _write_mrc(mrc, volume, voxel_size=float(config.get("volume_resolution", 2)))
    clouds = _brain_clouds(os.path.join(out_dir, "clouds"), volume, count=int(config.get("clouds", 48)),
                           points=int(config.get("points", 1024)))
    sheet = os.path.join(out_dir, "digits.png")
    _digits_sheet(images).save(sheet)
    return {"images": images, "heldout": heldout, "video": video, "volume": mrc, "clouds": clouds, "sheet": sheet}


def export_digits(root: str, heldout_root: str, heldout: int) -> tuple[str, str]:
    """The digits as PNGs in one folder per class; the last ``heldout`` go to a held-out folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    first_heldout = len(pixels) - heldout
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = os.path.join(root if i < first_heldout else heldout_root, str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
    return root, heldout_root


def _mni_volume(resolution: int) -> np.ndarray:
    """The MNI152 template as (z, y, x) float32 in [0, 1]."""
    from nilearn.datasets import load_mni152_template

    data = np.asarray(load_mni152_template(resolution=resolution).get_fdata(), dtype=np.float32)
    data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return (data - data.min()) / max(float(data.max() - data.min()), 1e-9)


def _write_mrc(path: str, volume: np.ndarray, voxel_size: float) -> None:
    import mrcfile

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = voxel_size


def _brain_clouds(folder: str, volume: np.ndarray, count: int, points: int) -> str:
    """``count`` clouds of ``points`` points on the brain's iso-surfaces (levels 0.2 to 0.6)."""
    from plyfile import PlyData, PlyElement
    from skimage.measure import marching_cubes

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    levels = np.linspace(0.2, 0.6, 5)
    surfaces = [marching_cubes(volume, level=float(level))[0] for level in levels]
    for k in range(count):
        verts = surfaces[k % len(surfaces)]
        picked = verts[rng.choice(len(verts), size=points, replace=False)].astype(np.float32)
        vertex = np.empty(points, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
        vertex["x"], vertex["y"], vertex["z"] = picked[:, 2], picked[:, 1], picked[:, 0]
        PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(os.path.join(folder, f"brain{k:03d}.ply"))
    return folder


def _digits_sheet(root: str, count: int = 100, scale: int = 4, columns: int = 10) -> Image.Image:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)[:count]
    tiles = [np.asarray(Image.open(p)) for p in paths]
    h, w = tiles[0].shape
    rows = int(np.ceil(len(tiles) / columns))
    sheet = np.zeros((rows * h, columns * w), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return Image.fromarray(sheet).resize((columns * w * scale, rows * h * scale), Image.NEAREST)
