"""Multi-axis rotary position embedding: each token carries grid coordinates, not an index.

``head_dim / 2`` rotary pairs are split across the coordinate axes (as evenly
as possible, earlier axes take the remainder); every pair of axis ``a`` is
rotated by ``coord[a] * freq``. The attention score of two tokens then depends
on their coordinate *differences* per axis: a 2-D image knows rows from
columns, a video knows time, a scale pyramid knows its level. Coordinates
may be fractional (scale-pyramid cells are placed at their centres in the
finest grid's units).
"""

from __future__ import annotations

import torch


def rope_sections(head_dim: int, n_axes: int) -> list[int]:
    """Rotary pairs given to each axis."""
    pairs = head_dim // 2
    base, extra = divmod(pairs, n_axes)
    return [base + (1 if a < extra else 0) for a in range(n_axes)]


def rope_angles(coords_BLA: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """``angle_BLP``: the rotation of every pair at every token (P = head_dim / 2).

    Computed on the fly from the coordinates (no buffer), so a model built on
    the ``meta`` device and materialized later needs no re-initialization.
    """
    n_axes = coords_BLA.shape[-1]
    dtype = torch.promote_types(coords_BLA.dtype, torch.float32) if coords_BLA.is_floating_point() else torch.float32
    freqs, axis = [], []
    for a, m in enumerate(rope_sections(head_dim, n_axes)):
        if m:
            freqs.append(theta ** (-torch.arange(m, dtype=torch.float64, device=coords_BLA.device) / m))
            axis.append(torch.full((m,), a, dtype=torch.long, device=coords_BLA.device))
    inv_freq_P = torch.cat(freqs).to(dtype)
    axis_P = torch.cat(axis)
    return coords_BLA.to(dtype)[..., axis_P] * inv_freq_P


def apply_rope(x_BHLD: torch.Tensor, angle_BLP: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` of every head by ``angle[i]``.

    Rotations run in at least float32: in bf16 a coordinate of 64 would already
    be off by a quarter radian.
    """
    dtype = torch.promote_types(x_BHLD.dtype, torch.float32)
    cos_B1LP = torch.cos(angle_BLP).unsqueeze(1).to(dtype)
    sin_B1LP = torch.sin(angle_BLP).unsqueeze(1).to(dtype)
    x_BHLP2 = x_BHLD.to(dtype).unflatten(-1, (-1, 2))
    x0, x1 = x_BHLP2[..., 0], x_BHLP2[..., 1]
    out = torch.stack((x0 * cos_B1LP - x1 * sin_B1LP, x0 * sin_B1LP + x1 * cos_B1LP), dim=-1)
    return out.flatten(-2).to(x_BHLD.dtype)
