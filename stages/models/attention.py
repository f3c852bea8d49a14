"""Attention kernels: the same rule as ``masks.attention_mask``, computed without a dense mask where possible.

``ModelConfig.attention`` picks how a forward without a KV cache attends:

- ``dense``: ``scaled_dot_product_attention`` with the boolean ``(B, 1, L, L)`` mask (the reference).
- ``sdpa``: no mask tensor when every row has the same group ids and no document boundaries. The
  queries are split into *segments*: a group's queries attend the keys up to the group's end with no
  mask, and a run of one-token groups (``next_token``) is one ``is_causal=True`` call. A context of
  several group-0 tokens (tag, class) is a segment of its own, so the result is exact, not "almost
  causal". Rows that differ (packed documents, padding) or too many segments fall back to ``dense``.
- ``flex``: ``flex_attention`` with a ``BlockMask`` built from group and document ids (block-sparse;
  packed batches included). torch 2.13 has no flex backward on CPU, so on CPU ``flex`` runs only
  without gradients and otherwise falls back to ``dense`` with one warning.
- ``auto``: ``sdpa`` segments when they exist, else ``flex`` on CUDA, else ``dense``.

A :class:`Layout` is built once per forward and shared by every layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .masks import attention_mask

#: more segments than this cost more in per-call overhead than the dense mask saves: next_block with blocks
#: of 16 at L = 680 (43 segments) ran 0.92x of dense on CPU, next_scale (11-14 segments) 1.5x faster
MAX_SEGMENTS = 16


@dataclass(frozen=True)
class Segment:
    """Queries ``[start, end)`` attend keys ``[0, end)``; ``causal``: key ``j`` only up to query ``i``."""

    start: int
    end: int
    causal: bool


@dataclass(frozen=True)
class Layout:
    """How every layer of one forward attends: exactly one of a dense mask, segments or a flex block mask."""

    mask_B1LK: torch.Tensor | None = None
    segments: tuple[Segment, ...] | None = None
    block_mask: Any = None  # torch.nn.attention.flex_attention.BlockMask

    @property
    def kernel(self) -> str:
        return "flex" if self.block_mask is not None else "sdpa" if self.segments is not None else "dense"

    def attend(self, q_BHLD: torch.Tensor, k_BHKD: torch.Tensor, v_BHKD: torch.Tensor) -> torch.Tensor:
        if self.block_mask is not None:
            return _flex(q_BHLD, k_BHKD, v_BHKD, self.block_mask)
        if self.segments is None:
            return F.scaled_dot_product_attention(q_BHLD, k_BHKD, v_BHKD, attn_mask=self.mask_B1LK)
        parts = []
        for s in self.segments:
            if s.causal:  # SDPA's is_causal aligns top-left, so run from query 0 and keep [start, end)
                y = F.scaled_dot_product_attention(q_BHLD[:, :, :s.end], k_BHKD[:, :, :s.end],
                                                   v_BHKD[:, :, :s.end], is_causal=True)
                parts.append(y[:, :, s.start:])
            else:
                parts.append(F.scaled_dot_product_attention(q_BHLD[:, :, s.start:s.end], k_BHKD[:, :, :s.end],
                                                            v_BHKD[:, :, :s.end]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def segments_for(group_ids_BL: torch.Tensor, doc_ids_BL: torch.Tensor | None = None) -> tuple[Segment, ...] | None:
    """Segments equal to ``attention_mask(group_ids_BL, doc_ids_BL)``, or None where none are exact.

    Exact when all rows share one non-decreasing row of group ids and one real document: then position
    ``i`` attends exactly the keys up to the end of its group.
    """
    B, L = group_ids_BL.shape
    if doc_ids_BL is not None and not bool(((doc_ids_BL == doc_ids_BL[:, :1]) & (doc_ids_BL >= 0)).all()):
        return None
    g_L = group_ids_BL[0]
    if B > 1 and not bool((group_ids_BL == g_L).all()):
        return None
    if L > 1 and not bool((g_L[1:] >= g_L[:-1]).all()):
        return None
    starts = [0] + (torch.nonzero(g_L[1:] != g_L[:-1]).flatten() + 1).tolist()
    ends = starts[1:] + [L]
    segments: list[Segment] = []
    run_start = None  # first query of the current run of one-token groups
    for s, e in zip(starts, ends, strict=True):
        if e - s == 1:
            run_start = s if run_start is None else run_start
            continue
        if run_start is not None:
            segments.extend(_run(run_start, s))
            run_start = None
        segments.append(Segment(s, e, causal=False))
    if run_start is not None:
        segments.extend(_run(run_start, L))
    return tuple(segments) if len(segments) <= MAX_SEGMENTS else None


def _run(start: int, end: int) -> list[Segment]:
    """A run of one-token groups: one causal call, unless it starts so late that recomputing ``[0, start)``
    would waste more than it saves; then one segment per token."""
    if start <= end - start:
        return [Segment(start, end, causal=True)]
    return [Segment(i, i + 1, causal=False) for i in range(start, end)]


def flex_available(device: torch.device) -> bool:
    """Whether ``flex_attention`` can run forward and backward on ``device`` in this torch build."""
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def layout_for(kind: str, group_ids_BL: torch.Tensor, doc_ids_BL: torch.Tensor | None = None) -> Layout:
    """The :class:`Layout` of ``kind`` (``auto``, ``sdpa``, ``flex``, ``dense``) for a whole-sequence forward."""
    device = group_ids_BL.device
    if kind in ("auto", "sdpa"):
        segments = segments_for(group_ids_BL, doc_ids_BL)
        if segments is not None:
            return Layout(segments=segments)
        if kind == "auto" and flex_available(device):
            kind = "flex"
    if kind == "flex":
        if flex_available(device) or not torch.is_grad_enabled():
            return Layout(block_mask=block_mask_for(group_ids_BL, doc_ids_BL))
        _warn_once("attention: flex has no backward on CPU in this torch build; using the dense mask "
                   "(set attention: sdpa or auto on CPU)")
    return Layout(mask_B1LK=attention_mask(group_ids_BL, doc_ids_BL))


def block_mask_for(group_ids_BL: torch.Tensor, doc_ids_BL: torch.Tensor | None = None) -> Any:
    """A flex ``BlockMask`` of ``masks.attention_mask``'s rule: same document, not a later group."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = group_ids_BL.shape
    groups = group_ids_BL.contiguous()
    if doc_ids_BL is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return groups[b, kv_idx] <= groups[b, q_idx]
    else:
        docs = doc_ids_BL.contiguous()

        def mask_mod(b, h, q_idx, kv_idx):
            same = (docs[b, kv_idx] == docs[b, q_idx]) & (docs[b, q_idx] >= 0)
            return (same & (groups[b, kv_idx] <= groups[b, q_idx])) | (q_idx == kv_idx)
    return create_block_mask(mask_mod, B, None, L, L, device=group_ids_BL.device)


_compiled_flex: Any = None


def _flex(q_BHLD: torch.Tensor, k_BHKD: torch.Tensor, v_BHKD: torch.Tensor, block_mask: Any) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if q_BHLD.device.type == "cuda":  # the fused kernel comes only from torch.compile
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q_BHLD, k_BHKD, v_BHKD, block_mask=block_mask)
    with warnings.catch_warnings():  # eager on CPU is the unfused reference: say so once in the docs, not per layer
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q_BHLD, k_BHKD, v_BHKD, block_mask=block_mask)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
