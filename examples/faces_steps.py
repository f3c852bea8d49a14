"""Callable of examples/faces_next_scale.yaml: scikit-image's LFW subset written as PNG folders.

``skimage.data.lfw_subset()`` holds 200 grey 25x25 crops of the Labeled Faces in the Wild photos:
100 faces and 100 patches of their backgrounds. They are written as the folders users have, one
sub-folder per class (``face``, ``background``: the reader takes the folder name as the class), and
the last ``heldout`` crops of each class go to a separate folder for held-out metrics.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLASSES = ("face", "background")   # lfw_subset(): the first 100 crops are faces, the next 100 not


def export_faces(config, inputs, out_dir):
    """``train/<class>/*.png`` and ``heldout/<class>/*.png`` under ``out_dir``; returns both folders."""
    from skimage.data import lfw_subset

    crops = lfw_subset()
    pixels = np.clip(np.rint(crops * 255.0), 0, 255).astype(np.uint8)
    heldout = int(config.get("heldout", 10))
    per_class = len(pixels) // len(CLASSES)
    train, held = os.path.join(out_dir, "train"), os.path.join(out_dir, "heldout")
    for i, image in enumerate(pixels):
        label = CLASSES[i // per_class]
        root = held if i % per_class >= per_class - heldout else train
        folder = os.path.join(root, label)
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
    return {"train": train, "heldout": held}
