"""Callable of examples/s3_storage.yaml: scikit-learn's handwritten digits as one .npy array and its labels.

One array file is how image sets often sit in object storage: readers fetch rows with ranged GETs, so
every tokenize task reads only its own rows (``rows_per_unit``), never the whole file.
"""

from __future__ import annotations

import os

import numpy as np


def export_digits(config, inputs, out_dir):
    """``digits.npy`` (N, 8, 8) uint8 and ``labels.npy`` (N,) under ``out_dir``; returns the image file."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    path = os.path.join(out_dir, "digits.npy")
    np.save(path, images)
    np.save(os.path.join(out_dir, "labels.npy"), digits.target.astype(np.int64))
    return {"images": path, "count": len(images)}
