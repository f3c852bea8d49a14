"""Control images (ControlAR): maps computed from an image that a model can be steered by.

``canny`` is scikit-image's Canny edge detector (a binary edge map), ``sobel`` its Sobel gradient
magnitude, both on the image's luma after it reached its stored size, ``sigma`` the Gaussian
smoothing of Canny. The map keeps the image's layout ``x_CHW`` (its channels repeat the map), values
in [0, 1], so any image tokenizer fitted on such maps encodes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath

import numpy as np

TRANSFORMS = ("canny", "sobel")
#: the kind a control map that pairs with no image is counted under (skipped, never silently)
UNPAIRED = "control map without image"
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def control_image(x_CHW: np.ndarray, transform: str, sigma: float = 1.0) -> np.ndarray:
    """The control map of one image ``x_CHW`` in [0, 1], the same shape, float32 in [0, 1]."""
    from skimage.feature import canny
    from skimage.filters import sobel

    gray_HW = x_CHW[0] if x_CHW.shape[0] == 1 else np.tensordot(_LUMA, x_CHW[:3], axes=1)
    if transform == "canny":
        edges_HW = canny(gray_HW.astype(np.float64), sigma=float(sigma)).astype(np.float32)
    elif transform == "sobel":
        # scikit-image scales the magnitude by 1/sqrt(2) (so a unit step is 0.5); 2x maps it onto [0, 1]
        edges_HW = np.clip(2.0 * sobel(gray_HW.astype(np.float64)), 0, 1).astype(np.float32)
    else:
        raise ValueError(f"unknown control transform {transform!r}; use one of {', '.join(TRANSFORMS)}")
    return np.ascontiguousarray(np.broadcast_to(edges_HW, x_CHW.shape), dtype=np.float32)


def name_key(relpath: str) -> str:
    """How an image and its control map pair: the relative path without its extension."""
    return str(PurePosixPath(relpath).with_suffix(""))


def pair_by_name(images: Iterable[str], maps: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(image relpath -> its map's relpath, the maps that pair with no image), matched by :func:`name_key`.

    Two maps with one name (``0001.png`` and ``0001.tif``) are ambiguous: ValueError naming both.
    """
    by_name: dict[str, str] = {}
    for rel in maps:
        other = by_name.setdefault(name_key(rel), rel)
        if other != rel:
            raise ValueError(f"two control maps {other} and {rel} have the name {name_key(rel)}")
    paired = {rel: by_name[name_key(rel)] for rel in images if name_key(rel) in by_name}
    used = {name_key(rel) for rel in paired}
    return paired, [rel for key, rel in by_name.items() if key not in used]
