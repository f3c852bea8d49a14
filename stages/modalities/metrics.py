"""Reconstruction metrics for tokenizers: PSNR and SSIM (images, video, volumes), Chamfer distance
(point clouds), codebook usage and perplexity (every tokenizer).

They take batched tensors (``x_BC<spatial>`` with 2 or 3 spatial axes) and
return one value per sample, so that a stage can log means and a test can
look at the worst sample. :func:`round_trip` is *the* tokenizer round-trip
score: the tokenizer stage's fit report and the evaluate stage's
``reconstruction/*`` metrics both come from it, so one name means one number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import by_shape


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample, in dB (``inf`` for identical samples)."""
    mse_B = (x.float() - y.float()).pow(2).reshape(x.shape[0], -1).mean(1)
    return 10 * torch.log10(data_range**2 / mse_B)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    w = torch.exp(-(t**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample (Wang et al. 2004, Gaussian window, valid region), 2-D or 3-D.

    The window shrinks to the smallest side for tiny samples (8x8 digits) so
    that the metric stays defined; sigma shrinks with it.
    """
    x, y = x.float(), y.float()
    b, c, *spatial = x.shape
    nd = len(spatial)
    size = min(window, *spatial)
    size -= 1 - size % 2  # odd
    sig = sigma * size / window
    g = _gaussian(size, sig)
    conv = F.conv2d if nd == 2 else F.conv3d

    def blur(t: torch.Tensor) -> torch.Tensor:
        for axis in range(nd):
            shape = [1] * nd
            shape[axis] = size
            t = conv(t, g.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
        return t

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.reshape(b, -1).mean(1)


#: PSNR of a sample reconstructed exactly is infinite; it is reported as this many dB so means stay finite
PSNR_CAP_DB = 100.0
#: SSIM's window, and the smallest side it is reported for (fewer pixels make its local statistics noise)
SSIM_WINDOW, SSIM_MIN_SIDE = 11, 7


def round_trip(modality: str, originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray]
               ) -> dict[str, list[float]]:
    """A tokenizer's round trip scored per sample: ``{"psnr": [...], "ssim": [...]}`` for images
    (``x_CHW``), video (``x_CTHW``) and volumes (``x_CDHW``), ``{"chamfer": [...]}`` for point clouds.

    The rules, one set for every caller:

    - data range: samples live in [0, 1] (the readers scale them there), so reconstructions are
      clamped to [0, 1] before scoring, as a viewer would show them; originals are taken as read;
    - PSNR is over the whole sample (all channels, frames, voxels), capped at ``PSNR_CAP_DB``;
    - SSIM (Gaussian window, sigma 1.5) is 2-D per frame for video, averaged over the clip's frames:
      a clip's frames are pictures, and time has no window the way space has; volumes get a 3-D
      window; images a 2-D one;
    - the window is ``SSIM_WINDOW`` (11) or, on smaller samples, the largest odd size that fits the
      smallest spatial side, sigma unchanged; below ``SSIM_MIN_SIDE`` (7) there is no ``ssim`` key;
    - point clouds: the symmetric Chamfer distance of each pair, in the clouds' unit.

    Means over samples are what a stage reports; per-sample values are what its tables hold.
    """
    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals but {len(reconstructions)} reconstructions")
    if not originals:
        return {}
    if modality == "pointcloud":
        return {"chamfer": [chamfer_distance(a, b) for a, b in zip(originals, reconstructions)]}
    groups = by_shape(originals)
    if len(groups) > 1:   # samples of several sizes (flexvq): each size scored as its own batch
        scores: dict[str, list[float]] = {}
        for _shape, at in groups:
            part = round_trip(modality, [originals[i] for i in at], [reconstructions[i] for i in at])
            for name, values in part.items():
                slots = scores.setdefault(name, [math.nan] * len(originals))
                for i, v in zip(at, values):
                    slots[i] = v
        # a measure some size has no value for (SSIM under SSIM_MIN_SIDE) is left out, as for one size
        return {name: values for name, values in scores.items() if not any(math.isnan(v) for v in values)}
    x = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in originals]))
    y = torch.from_numpy(np.stack([np.asarray(b, dtype=np.float32) for b in reconstructions])).clamp(0, 1)
    scores = {"psnr": psnr(x, y).clamp(max=PSNR_CAP_DB).tolist()}
    frames = 1
    if modality == "video":   # x_BCTHW -> frames x_(BT)CHW, scored as pictures
        b, c, frames = x.shape[:3]
        x, y = (t.transpose(1, 2).reshape(b * frames, c, *t.shape[3:]) for t in (x, y))
    side = min(x.shape[2:])
    if side >= SSIM_MIN_SIDE:
        window = min(SSIM_WINDOW, side - (1 - side % 2))
        scores["ssim"] = ssim(x, y, window=window).reshape(-1, frames).mean(1).tolist()
    return scores


def chamfer_distance(a_N3: torch.Tensor | np.ndarray, b_M3: torch.Tensor | np.ndarray,
                     chunk: int = 4096) -> float:
    """Symmetric Chamfer distance: the mean Euclidean distance from each point to the other cloud's
    nearest point, averaged over both directions (same unit as the coordinates)."""
    a = torch.as_tensor(np.asarray(a_N3), dtype=torch.float64) if not isinstance(a_N3, torch.Tensor) else a_N3.double()
    b = torch.as_tensor(np.asarray(b_M3), dtype=torch.float64) if not isinstance(b_M3, torch.Tensor) else b_M3.double()
    if a.shape[0] == 0 or b.shape[0] == 0:
        return math.inf

    def one_way(p: torch.Tensor, q: torch.Tensor) -> float:
        total = 0.0
        for s in range(0, p.shape[0], chunk):
            # the direct form: the matmul shortcut loses the small distances that matter here
            d = torch.cdist(p[s:s + chunk], q, compute_mode="donot_use_mm_for_euclid_dist")
            total += float(d.min(1).values.sum())
        return total / p.shape[0]

    return 0.5 * (one_way(a, b) + one_way(b, a))


def codebook_usage(idx: torch.Tensor | np.ndarray, vocab_size: int) -> dict[str, float]:
    """Share of the vocabulary used and perplexity (exp of the token entropy; vocab_size at best)."""
    counts = torch.bincount(torch.as_tensor(np.asarray(idx)).reshape(-1).long(), minlength=vocab_size).double()
    total = counts.sum()
    if total == 0:
        return {"used": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"used": float((counts > 0).sum()) / vocab_size, "perplexity": float(torch.exp(-(p * p.log()).sum()))}
