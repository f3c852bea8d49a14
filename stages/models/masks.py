"""Who attends to whom: one rule for every paradigm, for training and for cached decoding.

Each token carries a document id and a *group* id. Position ``i`` attends
position ``j`` exactly when both are in the same document and
``group[j] <= group[i]``. The paradigm lives entirely in how groups are
numbered (see ``sequence.py``): ``next_token`` gives every target its own group
(causal), ``next_block`` one group per block of B tokens and ``next_scale``
one group per scale (block-causal: bidirectional inside a group, causal
across groups). The context (tag, class) is group 0. Padding (document -1)
attends only itself, so no softmax row is empty.

Masks are boolean, ``True`` = may attend, shaped ``(B, 1, Q, K)`` for
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch


def attention_mask(group_ids_BL: torch.Tensor, doc_ids_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Full-sequence mask ``(B, 1, L, L)``: same document and not a later group."""
    B, L = group_ids_BL.shape
    allowed_BLL = group_ids_BL[:, None, :] <= group_ids_BL[:, :, None]
    if doc_ids_BL is not None:
        same_doc_BLL = doc_ids_BL[:, None, :] == doc_ids_BL[:, :, None]
        real_BL = doc_ids_BL >= 0
        eye_LL = torch.eye(L, dtype=torch.bool, device=group_ids_BL.device)
        allowed_BLL = (allowed_BLL & same_doc_BLL & real_BL[:, :, None]) | eye_LL
    return allowed_BLL.unsqueeze(1)


def cached_attention_mask(group_ids_BQ: torch.Tensor, start_B: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Mask ``(B, 1, Q, n_keys)`` for a chunk of ``Q`` new positions written at ``start_B`` in a KV cache.

    Keys before a row's start are its committed past: all earlier groups of
    the same (single) document, always visible. Keys inside the chunk follow
    the group rule; keys after it are stale cache slots and stay hidden.
    """
    Q = group_ids_BQ.shape[1]
    key_pos_K = torch.arange(n_keys, device=group_ids_BQ.device)
    rel_BK = key_pos_K[None, :] - start_B[:, None]
    past_BK = rel_BK < 0
    in_chunk_BK = (rel_BK >= 0) & (rel_BK < Q)
    key_group_BK = torch.gather(group_ids_BQ, 1, rel_BK.clamp(0, Q - 1))
    chunk_BQK = (key_group_BK[:, None, :] <= group_ids_BQ[:, :, None]) & in_chunk_BK[:, None, :]
    return (chunk_BQK | past_BK[:, None, :]).unsqueeze(1)
