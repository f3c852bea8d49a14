"""Real data that ships inside packages, written as the files users have: PNG folders, GIF, MRC, PLY."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_folder(root: Path, count: int = 300, start: int = 0) -> Path:
    """scikit-learn's handwritten digits as 8x8 PNGs in one sub-folder per class (the label)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(start, start + count):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def gif_path() -> Path:
    """scikit-image's 24-frame GIF (14 x 25 pixels, RGB)."""
    import skimage

    return Path(skimage.__file__).parent / "data" / "no_time_for_that_tiny.gif"


def mni_volume(resolution: int = 2) -> np.ndarray:
    """nilearn's MNI152 template, a real 3-D MRI volume (z, y, x), float32 in [0, 1]."""
    from nilearn.datasets import load_mni152_template

    data = np.asarray(load_mni152_template(resolution=resolution).get_fdata(), dtype=np.float32)
    data = np.transpose(data, (2, 1, 0))
    return (data - data.min()) / max(float(data.max() - data.min()), 1e-9)


def mni_mrc(path: Path, resolution: int = 2) -> Path:
    import mrcfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(mni_volume(resolution))
        mrc.voxel_size = float(resolution)
    return path


def brain_clouds(folder: Path, count: int = 4, points: int = 2048, seed: int = 0) -> Path:
    """Point clouds sampled on the MNI152 brain surface (marching cubes), written as binary PLY files."""
    from plyfile import PlyData, PlyElement
    from skimage.measure import marching_cubes

    volume = mni_volume(2)
    verts, _faces, _n, _v = marching_cubes(volume, level=0.3)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        picked = verts[rng.choice(len(verts), size=points, replace=False)].astype(np.float32)
        vertex = np.array([tuple(p) for p in picked], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
        PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(str(folder / f"brain{k}.ply"))
    return folder
