"""Callable of examples/em_volume.yaml: a real 3-D volume written as anisotropic MRC files, as EM stacks come.

Serial-section EM is anisotropic: sections are cut thicker than the pixels are wide. No package ships an
EM stack, so nilearn's MNI152 brain template (a real MRI volume, 2 mm voxels) stands in for one: every
two z slices are averaged into one, giving voxels of 4 x 2 x 2 mm (z, y, x), and the MRC header says so.
Cut to the brain's bounding box, the back of the brain (the occipital lobe, y < ``heldout_y`` voxels) is
the held-out volume and the rest the training volume. (Not the right hemisphere: the template is exactly
symmetric, so it would be the left one mirrored.)
"""

from __future__ import annotations

import os

import numpy as np


def export_volume(config, inputs, out_dir):
    """``train.mrc`` and ``heldout.mrc`` under ``out_dir``; returns their paths."""
    from nilearn.datasets import load_mni152_template

    resolution = int(config.get("resolution", 2))
    z_factor = int(config.get("z_factor", 2))
    data = np.asarray(load_mni152_template(resolution=resolution).get_fdata(), dtype=np.float32)
    zyx = np.transpose(data, (2, 1, 0))                     # nibabel's (x, y, z) -> (z, y, x)
    zyx = (zyx - zyx.min()) / max(float(zyx.max() - zyx.min()), 1e-9)
    depth = zyx.shape[0] // z_factor * z_factor
    thick = zyx[:depth].reshape(depth // z_factor, z_factor, *zyx.shape[1:]).mean(1)   # thicker sections
    lo, hi = np.argwhere(thick > 0.05).min(0), np.argwhere(thick > 0.05).max(0) + 1
    thick = thick[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]    # the brain's bounding box: mostly tissue, as EM is
    voxel_zyx = (resolution * z_factor, resolution, resolution)
    back = int(config.get("heldout_y", 24))                 # y runs from the back of the head to the front
    paths = {"train": os.path.join(out_dir, "train.mrc"), "heldout": os.path.join(out_dir, "heldout.mrc")}
    write_mrc(paths["train"], thick[:, back:], voxel_zyx)
    write_mrc(paths["heldout"], thick[:, :back], voxel_zyx)
    return paths


def write_mrc(path: str, volume_zyx: np.ndarray, voxel_zyx: tuple[float, float, float]) -> None:
    import mrcfile

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume_zyx, dtype=np.float32))
        mrc.voxel_size = tuple(reversed(voxel_zyx))         # mrcfile takes (x, y, z)
