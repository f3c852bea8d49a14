"""Captioned digits: scikit-learn's digits with captions that say what each image shows, measured from it.

Each caption names the digit and, where the image stands out among its class, two measured attributes:
its ink (``thick``: the class's top third by ink, ``thin``: its bottom third) and its slant (``slanted``:
the top third by how far the shear of its image moments is from the class's median shear). So "a thick,
slanted seven", "a thin two", "an eight". The first stage writes them as a ``captions.csv`` sidecar
beside the PNGs, the way a user's own captions arrive, so the readers' caption path is what is exercised.
"""

from __future__ import annotations

import csv
import os

import numpy as np

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def ink(images_NHW: np.ndarray) -> np.ndarray:
    """Total intensity of each image (stroke area times darkness)."""
    return images_NHW.reshape(len(images_NHW), -1).sum(axis=1)


def shear(images_NHW: np.ndarray) -> np.ndarray:
    """mu11 / mu02 of each image's intensity moments: how far x moves per row, the stroke's slant."""
    n, h, w = images_NHW.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    m = images_NHW.astype(np.float64) + 1e-9
    total = m.sum(axis=(1, 2))
    xc, yc = (m * x).sum(axis=(1, 2)) / total, (m * y).sum(axis=(1, 2)) / total
    dx, dy = x[None] - xc[:, None, None], y[None] - yc[:, None, None]
    return (m * dx * dy).sum(axis=(1, 2)) / (m * dy * dy).sum(axis=(1, 2))


def describe(images_NHW: np.ndarray, labels_N: np.ndarray) -> list[str]:
    """One caption per image, its attributes measured against the other images of its class."""
    thickness, slant = ink(images_NHW), shear(images_NHW)
    captions = [""] * len(labels_N)
    for label in np.unique(labels_N):
        members = np.flatnonzero(labels_N == label)
        lo, hi = np.quantile(thickness[members], [1 / 3, 2 / 3])
        off = np.abs(slant[members] - np.median(slant[members]))
        slanted_from = np.quantile(off, 2 / 3)
        for i, o in zip(members, off):
            words = (["thick"] if thickness[i] > hi else ["thin"] if thickness[i] < lo else [])
            words += ["slanted"] if o > slanted_from else []
            phrase = " ".join(([", ".join(words)] if words else []) + [NUMBERS[int(label)]])
            captions[i] = ("an " if phrase.startswith("eight") else "a ") + phrase
    return captions


def export_captioned(config, inputs, out_dir):
    """The digits as PNGs in one folder per class and ``captions.csv`` (file, caption) at its root."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = int(config.get("count", len(digits.target)))
    images, labels = digits.images[:count], digits.target[:count]
    root = os.path.join(out_dir, "images")
    rows = []
    for i, (image, label, caption) in enumerate(zip(images, labels, describe(images, labels))):
        rel = f"{label}/{i:04d}.png"
        os.makedirs(os.path.join(root, str(label)), exist_ok=True)
        Image.fromarray(np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)).save(os.path.join(root, rel))
        rows.append({"file": rel, "caption": caption})
    with open(os.path.join(root, "captions.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"captioned {len(rows)} digits, e.g. {rows[0]['caption']!r}, {rows[-1]['caption']!r}", flush=True)
    return {"images": root}
