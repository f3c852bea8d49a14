"""Digits at several sizes for FlexVAR-style training (examples/flexible_digits.yaml).

scikit-learn's 8x8 digits, upsampled (bilinear, as PIL resizes) and written as PNGs of each size in
``sizes`` into one folder per class: ``train/<class>/<i>_<side>.png``, so one token store holds images
of every size and one model trains on all of them. The last ``heldout`` digits go to
``heldout_<side>/<class>/``, one folder per size (outputs ``heldout_16``, ...).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def export_sizes(config, inputs, out_dir):
    """Write the digits at every side in ``config["sizes"]``; returns the ``train`` folder and one
    ``heldout_<side>`` folder per size."""
    from sklearn.datasets import load_digits

    sizes = [int(s) for s in config.get("sizes", [16, 32])]
    heldout = int(config.get("heldout", 297))
    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    first_heldout = len(pixels) - heldout
    train = os.path.join(out_dir, "train")
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        for side in sizes:
            folder = (os.path.join(train, str(label)) if i < first_heldout
                      else os.path.join(out_dir, f"heldout_{side}", str(label)))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).resize((side, side), Image.BILINEAR).save(
                os.path.join(folder, f"{i:04d}_{side}.png"))
    return {"train": train, **{f"heldout_{side}": os.path.join(out_dir, f"heldout_{side}") for side in sizes}}
