"""Callables of examples/quickstart.yaml: real data (scikit-learn's 1797 handwritten digits)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def export_digits(config, inputs, out_dir):
    """The digits as PNG files in one folder per class: what an image dataset looks like on disk."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    root = os.path.join(out_dir, "images")
    for i, (image, label) in enumerate(zip(images, digits.target)):
        folder = os.path.join(root, str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
    sheet_path = os.path.join(out_dir, "digits.png")
    _contact_sheet(images[: config.get("sheet", 100)], scale=4).save(sheet_path)
    return {"images": root, "sheet": sheet_path, "count": int(len(images))}


def _contact_sheet(images: np.ndarray, scale: int, columns: int = 10) -> Image.Image:
    rows = int(np.ceil(len(images) / columns))
    h, w = images.shape[1:3]
    sheet = np.zeros((rows * h, columns * w), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return Image.fromarray(sheet).resize((columns * w * scale, rows * h * scale), Image.NEAREST)
