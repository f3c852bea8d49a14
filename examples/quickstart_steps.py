"""Callables of examples/quickstart.yaml: real data (scikit-learn's 1797 handwritten digits)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def load_digits(config, inputs, out_dir):
    """The 8x8 digits as uint8 images with their labels, plus a contact sheet a person can look at."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    path = os.path.join(out_dir, "digits.npz")
    np.savez_compressed(path, images=images, labels=digits.target.astype(np.int64))
    sheet = _contact_sheet(images[: config.get("sheet", 100)], scale=4)
    sheet_path = os.path.join(out_dir, "digits.png")
    sheet.save(sheet_path)
    return {"digits": path, "sheet": sheet_path, "count": int(len(images))}


def class_means(config, inputs, out_dir):
    data = np.load(inputs["digits"])
    images, labels = data["images"].astype(np.float64), data["labels"]
    means = np.stack([images[labels == k].mean(axis=0) for k in range(10)])
    path = os.path.join(out_dir, "means.npy")
    np.save(path, means)
    _contact_sheet(means.astype(np.uint8), scale=8, columns=10).save(os.path.join(out_dir, "means.png"))
    return {"means": path}


def evaluate(config, inputs, out_dir):
    """Nearest-class-mean accuracy: a baseline the AR models of later stages are compared with."""
    data = np.load(inputs["digits"])
    means = np.load(inputs["means"]).reshape(10, -1)
    flat = data["images"].reshape(len(data["images"]), -1).astype(np.float64)
    predicted = np.argmin(((flat[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = float((predicted == data["labels"]).mean())
    return {"accuracy": accuracy}


def _contact_sheet(images: np.ndarray, scale: int, columns: int = 10) -> Image.Image:
    rows = int(np.ceil(len(images) / columns))
    h, w = images.shape[1:3]
    sheet = np.zeros((rows * h, columns * w), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return Image.fromarray(sheet).resize((columns * w * scale, rows * h * scale), Image.NEAREST)
