"""Non-overlapping patches of 2-D and 3-D grids, and token grid coordinates.

The same reshape serves images (``x_BCHW``, patch p x p), volumes
(``x_BCDHW``, p x p x p) and video tubelets (``x_BCTHW``, t x p x p).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import TokenizerError

#: axis names of a token grid by spatial rank and modality
AXES = {
    ("image", 2): ("y", "x"),
    ("video", 3): ("t", "y", "x"),
    ("volume", 3): ("z", "y", "x"),
}


def grid_of(spatial: Sequence[int], patch: Sequence[int], tokenizer: str) -> tuple[int, ...]:
    """Token grid of a sample shape; every side must be a multiple of its patch side."""
    if len(spatial) != len(patch):
        raise TokenizerError(f"{tokenizer}: patch {tuple(patch)} has {len(patch)} sides but samples have "
                             f"{len(spatial)} spatial axes {tuple(spatial)}",
                             fix="give one patch side per spatial axis")
    bad = [(s, p) for s, p in zip(spatial, patch, strict=True) if p < 1 or s % p]
    if bad:
        raise TokenizerError(f"{tokenizer}: sample shape {tuple(spatial)} is not a multiple of patch {tuple(patch)}",
                             fix="resize/crop samples to a multiple of the patch size")
    return tuple(s // p for s, p in zip(spatial, patch, strict=True))


def patchify(x_BCS: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``x_BC<spatial>`` -> ``z_BLD`` with L = prod(grid), D = C * prod(patch)."""
    b, c, *spatial = x_BCS.shape
    nd = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch, strict=True)]
    shape = [b, c]
    for g, p in zip(grid, patch, strict=True):
        shape += [g, p]
    x = x_BCS.reshape(shape)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...)
    perm = [0] + [2 + 2 * i for i in range(nd)] + [1] + [3 + 2 * i for i in range(nd)]
    return x.permute(perm).reshape(b, math.prod(grid), c * math.prod(patch))


def unpatchify(z_BLD: torch.Tensor, grid: Sequence[int], patch: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = z_BLD.shape[0]
    nd = len(grid)
    x = z_BLD.reshape([b, *grid, channels, *patch])
    # (B, g0.., C, p0..) -> (B, C, g0, p0, g1, p1, ...)
    perm = [0, 1 + nd]
    for i in range(nd):
        perm += [1 + i, 2 + nd + i]
    return x.permute(perm).reshape([b, channels, *(g * p for g, p in zip(grid, patch, strict=True))])


def to_grid(z_BLD: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``z_BLD`` -> ``f_BD<grid>`` (channels first, for interpolation and convolution)."""
    b, _, d = z_BLD.shape
    return z_BLD.transpose(1, 2).reshape([b, d, *grid])


def from_grid(f_BDS: torch.Tensor) -> torch.Tensor:
    """``f_BD<grid>`` -> ``z_BLD``."""
    b, d = f_BDS.shape[:2]
    return f_BDS.reshape(b, d, -1).transpose(1, 2)


def grid_positions(grid: Sequence[int]) -> torch.Tensor:
    """``pos_LK``: row-major coordinates of every cell of ``grid`` (the token order)."""
    axes = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=1)


def axes_for(modality: str, nd: int) -> tuple[str, ...]:
    try:
        return AXES[(modality, nd)]
    except KeyError:
        raise TokenizerError(f"modality {modality!r} with {nd} spatial axes is not supported",
                             fix="use image with 2-D patches, or video/volume with 3-D patches") from None
