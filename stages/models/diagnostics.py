"""Teacher-forced diagnostics: held-out loss and top-1 accuracy per scale (or per part of the sequence).

A next-scale model that draws blotches usually has one scale that lags; the
mean loss hides which. :func:`segment_scores` splits the loss of a batch by
*segment*: the scale for ``next_scale`` (``scale_1`` is the coarsest), the octree level for ``next_level``
(``level_0`` is the root's mask), else
one of ``parts`` equal shares of the target groups in order (``part_1`` holds
the first blocks or tokens). Sums and counts come back so ranks and batches
add up before the means are taken.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sequence import IGNORE_INDEX

PARTS = 8


#: the paradigms whose groups are the segments (one scale or level each)
BY_GROUP = {"next_scale": ("scale", 1), "next_level": ("level", 0)}


def segment_names(paradigm: str, n_segments: int) -> list[str]:
    word, first = BY_GROUP.get(paradigm, ("part", 1))
    return [f"{word}_{k + first}" for k in range(n_segments)]


def segment_ids(group_ids_BL: torch.Tensor, paradigm: str, parts: int = PARTS) -> torch.Tensor:
    """0-based segment of every position (``-1`` on context); rows hold one document each.

    ``group_ids`` are 1 + the group index on target positions and 0 on the context (``Plan``).
    """
    g_BL = group_ids_BL.long() - 1
    if paradigm in BY_GROUP:
        return g_BL.clamp_min(-1)
    n_groups_B1 = g_BL.amax(dim=1, keepdim=True).clamp_min(0) + 1
    seg_BL = torch.div(g_BL.clamp_min(0) * min(parts, int(n_groups_B1.max())), n_groups_B1, rounding_mode="floor")
    return torch.where(g_BL >= 0, seg_BL, torch.full_like(seg_BL, -1))


def segment_scores(logits_BLV: torch.Tensor, targets_BL: torch.Tensor, group_ids_BL: torch.Tensor, paradigm: str,
                   n_segments: int) -> torch.Tensor:
    """``(3, n_segments)`` float64: summed cross-entropy (nats), correct top-1 predictions, scored targets."""
    seg_BL = segment_ids(group_ids_BL, paradigm).to(targets_BL.device)
    scored_BL = (targets_BL != IGNORE_INDEX) & (seg_BL >= 0) & (seg_BL < n_segments)
    ce_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), targets_BL.clamp_min(0), reduction="none")
    correct_BL = (logits_BLV.argmax(-1) == targets_BL).double()
    out = torch.zeros(3, n_segments, dtype=torch.float64, device=targets_BL.device)
    seg = seg_BL[scored_BL]
    out[0].index_add_(0, seg, ce_BL[scored_BL].double())
    out[1].index_add_(0, seg, correct_BL[scored_BL])
    out[2].index_add_(0, seg, torch.ones_like(seg, dtype=torch.float64))
    return out
