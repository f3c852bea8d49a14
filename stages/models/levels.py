"""The ``next_level`` paradigm (G3PT-style level of detail): an octree's tokens predicted one level at a time.

An octree tokenizer (``modalities.octree``) writes a point cloud as child-occupancy masks, level by level:
level 0 is the root's mask and level ``l`` holds one mask per occupied cell of the ``2^l`` grid, as many as
the set bits of level ``l - 1``'s masks, in Morton order. G3PT (Zhang et al., 2024) generates such a
level-of-detail hierarchy coarse to fine, one whole level from all coarser ones, as VAR does scales. Under
``next_level`` each level of a tree is one group of its :class:`~.sequence.Plan`:

- ``group``: level ``l`` is group ``l + 1`` (the context is group 0). A cell attends every coarser level and
  every cell of its own level: attention inside a level is full, as inside a VAR scale, because a position's
  input is known before its level is drawn (its parent's mask and its cell), so a sibling's input leaks no
  target and tells the cell which other cells of its level are occupied. Given the coarser levels, the masks
  of one level are drawn independently, in one forward.
- ``source``: a cell's input is its parent's mask (the token of level ``l - 1`` that marked it occupied);
  the root reads ``BOS``.
- ``coords``: ``(level, x, y, z)``, the cell's centre in units of the finest token level's cells,
  ``(q + 0.5) 2^(depth - 1 - l) - 0.5`` for the integer cell ``q`` of level ``l`` (next_scale places a scale's
  cells in the finest scale's grid alike). The rotary embedding then sees the 3-D offsets between a cell,
  its parent and its neighbours at every level, where next_token sees offsets in a flat sequence.

A tree's plan follows its own tokens (:meth:`OctreePlan.plan_of`): training lays out each document with its
own plan (rows may pack several). Sampling (:func:`generate_levels`) draws a whole level per forward for every
sample of a batch: the next level's cells come from the masks just drawn, one query per cell; rows with fewer
cells are padded with positions no cell attends. Sampling stops at the tokenizer's depth; a sample whose level
has no occupied cell, or whose next level would pass ``n_tokens``, stops there incomplete and does not decode
(the sample stage quarantines it, as other variable-length samples that do not decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..modalities.octree import child_nodes, morton_decode
from .sampling import (
    Generation,
    Prompt,
    SamplingOptions,
    draw,
    guided_context,
    guided_probs,
    sample_generator,
)
from .sequence import ModelInputs, Plan, _pad_axes, context_coords, pack_documents
from .transformer import Transformer
from .vocab import BOS, PAD

#: the axes an octree tokenizer's ``layout()`` names
OCTREE_AXES = ("level", "x", "y", "z")


def octree_depth(layout: dict[str, Any]) -> int | None:
    """The depth of an octree tokenizer's token layout (its ``layout()``); None for any other layout."""
    if tuple(layout.get("axes") or ()) == OCTREE_AXES and layout.get("depth") and layout.get("variable_length"):
        return int(layout["depth"])
    return None


def cell_coords(level: int, nodes_N: np.ndarray, depth: int, n_axes: int) -> torch.Tensor:
    """``coords_NA``: ``(level, x, y, z)`` of level ``level``'s cells (Morton codes ``nodes_N``), centred in units
    of the finest token level's cells (level ``depth - 1``), zero-padded to ``n_axes``."""
    q_N3 = torch.from_numpy(morton_decode(np.asarray(nodes_N, dtype=np.int64), level)).double()
    centres_N3 = (q_N3 + 0.5) * float(1 << (depth - 1 - level)) - 0.5
    level_N1 = torch.full((q_N3.shape[0], 1), float(level), dtype=torch.float64)
    return _pad_axes(torch.cat([level_N1, centres_N3], dim=1), n_axes).float()


@dataclass(frozen=True)
class OctreePlan:
    """The next_level plan of an octree modality: one :class:`Plan` per tree (:meth:`plan_of`), and what the
    sampler needs: the tokenizer's ``depth`` (one group per level) and ``n_tokens``, the most tokens a sampled
    tree may hold."""

    depth: int
    n_tokens: int
    n_axes: int = 4
    paradigm: ClassVar[str] = "next_level"

    def __post_init__(self) -> None:
        if self.depth < 1 or self.n_tokens < 1:
            raise ValueError(f"an octree plan needs depth >= 1 and n_tokens >= 1, got {self.depth} and "
                             f"{self.n_tokens}")

    @classmethod
    def for_layout(cls, layout: dict[str, Any], n_tokens: int, n_axes: int = 4) -> OctreePlan:
        """The plan of an octree tokenizer's ``layout()``; a ValueError for any other tokenizer's."""
        depth = octree_depth(layout)
        if depth is None:
            raise ValueError(f"next_level predicts an octree level by level; these tokens are laid out on axes "
                             f"{list(layout.get('axes') or [])} (not an octree tokenizer's); use paradigm next_token")
        return cls(depth=depth, n_tokens=int(n_tokens), n_axes=n_axes)

    @property
    def n_groups(self) -> int:
        return self.depth

    def plan_of(self, masks_N: np.ndarray | torch.Tensor) -> Plan:
        """The plan of one tree from its tokens (local codes: child masks, levels in order)."""
        masks = np.asarray(masks_N.cpu() if isinstance(masks_N, torch.Tensor) else masks_N, dtype=np.int64)
        masks = masks.reshape(-1)
        if masks.size and (masks.min() < 0 or masks.max() > 255):
            raise ValueError("octree tokens are child masks in [0, 255]; pass the tree's local codes")
        nodes, parents_N = np.zeros(1, dtype=np.int64), np.full(1, -1, dtype=np.int64)
        sizes, sources, coords, offset = [], [], [], 0
        for level in range(self.depth):
            n = int(nodes.size)
            if n == 0 or offset + n > masks.size:
                raise ValueError(f"the {masks.size} tokens do not form an octree of depth {self.depth}: level "
                                 f"{level} {'has no occupied cell' if n == 0 else 'is cut short'}")
            sizes.append(n)
            sources.append(parents_N)
            coords.append(cell_coords(level, nodes, self.depth, self.n_axes))
            nodes, parent_in_level = child_nodes(nodes, masks[offset:offset + n])
            parents_N = offset + parent_in_level
            offset += n
        if offset != masks.size:
            raise ValueError(f"the {masks.size} tokens hold {masks.size - offset} past the octree's depth "
                             f"{self.depth}")
        return Plan(paradigm=self.paradigm, group_sizes=tuple(sizes),
                    source_N=torch.from_numpy(np.concatenate(sources)).long(), coords_NA=torch.cat(coords))


def level_inputs(plan: OctreePlan, targets_BN: torch.Tensor, context_BP: torch.Tensor,
                 code_start: int) -> ModelInputs:
    """Rows of one tree each (``targets_BN``: global ids, as many per row), each laid out by its own plan."""
    docs = [[(plan.plan_of(t_N - code_start), t_N, c_P)] for t_N, c_P in zip(targets_BN.cpu(), context_BP.cpu())]
    return pack_documents(docs, context_BP.shape[1] + targets_BN.shape[1]).to(targets_BN.device)


@torch.no_grad()
def generate_levels(model: Transformer, plan: OctreePlan, prompt: Prompt,
                    options: SamplingOptions = SamplingOptions(), *, seed: int = 0,
                    sample_indices: Sequence[int] | None = None) -> Generation:
    """Sample one tree per prompt row, one forward pass per level for the whole batch.

    ``prompt.allowed`` must be the octree's code range (``Prompt.from_vocab`` sets it): its start turns drawn
    ids into masks. The result holds ``plan.n_tokens`` ids per row, each sample's tree first and its length
    in ``lengths`` (positions past it hold the first code and mean nothing); ``sample_passes`` counts the
    levels each sample was drawn in. CFG's linear schedule ramps over the levels.
    """
    config = model.config
    if config.paradigm != "next_level":
        raise ValueError(f"generate_levels samples next_level models; this one is {config.paradigm}")
    if prompt.prefix_BM is not None or prompt.known_BN is not None or options.lookahead > 1:
        raise ValueError("next_level draws whole trees: a prefix, known tokens and lookahead need a fixed token "
                         "layout")
    if prompt.allowed is None:
        raise ValueError("next_level reads drawn ids as child masks: give the octree's code range (Prompt.allowed)")
    code_start = prompt.allowed[0]
    B, cap, depth, A = prompt.batch, plan.n_tokens, plan.depth, plan.n_axes
    context = guided_context(prompt, options)
    R, P = context.shape
    if P + cap > config.max_seq_len:
        raise ValueError(f"{P} context + {cap} target tokens exceed the model's max_seq_len {config.max_seq_len}")
    indices = list(range(B)) if sample_indices is None else list(sample_indices)
    if len(indices) != B:
        raise ValueError(f"{len(indices)} sample indices for {B} samples")
    gens = [sample_generator(seed, i) for i in indices]
    dev = next(model.parameters()).device

    # rows [context | the tree so far | the level being drawn | slack]: a level's padding can reach past cap
    T = P + 2 * cap
    input_RT = torch.full((R, T), PAD, dtype=torch.long)
    input_RT[:, :P] = context
    coords_RTA = torch.zeros(R, T, A)
    coords_RTA[:, :P] = context_coords(P, A)
    hidden = depth + 2   # a group no cell's query reaches: padding and unused slots
    group_RT = torch.full((R, T), hidden, dtype=torch.long)
    group_RT[:, :P] = 0
    cache = model.new_cache(R, T) if options.use_cache else None

    tokens_BN = torch.full((B, cap), code_start, dtype=torch.long)
    logprobs_BN = torch.zeros(B, cap, dtype=torch.float64)
    lengths_B = torch.zeros(B, dtype=torch.long)
    passes_B = torch.zeros(B, dtype=torch.long)
    nodes = [np.zeros(1, dtype=np.int64) for _ in range(B)]     # each row's cells of the level to draw
    parents = [np.full(1, -1, dtype=np.int64) for _ in range(B)]  # and their parents' token indices
    forward_passes = 0
    for level in range(depth):
        for b in range(B):   # a tree whose next level would pass the capacity stops, incomplete
            if int(lengths_B[b]) + nodes[b].size > cap:
                nodes[b], parents[b] = nodes[b][:0], parents[b][:0]
        counts = [int(n.size) for n in nodes]
        Q = max(counts)
        if Q == 0:
            break
        begin_B = P + lengths_B
        for b, n in enumerate(counts):
            at = int(begin_B[b])
            rows = slice(b, R, B)   # the sample's conditional and unconditional rows
            src = torch.from_numpy(parents[b])
            ids = torch.where(src >= 0, tokens_BN[b, src.clamp_min(0)], torch.full_like(src, BOS))
            input_RT[rows, at:at + n] = ids
            input_RT[rows, at + n:at + Q] = PAD
            coords_RTA[rows, at:at + n] = cell_coords(level, nodes[b], depth, A)
            coords_RTA[rows, at + n:at + Q] = 0.0
            group_RT[rows, at:at + n] = level + 1
            group_RT[rows, at + n:at + Q] = hidden
        begin_R = (begin_B if level else torch.zeros(B, dtype=torch.long)).repeat(R // B)
        width = Q + (0 if level else P)   # the first pass also runs the context
        logits_RQV = _run(model, input_RT, coords_RTA, group_RT, begin_R, width, cache, dev)[:, -Q:]
        forward_passes += 1
        scale_BQ = torch.full((B, Q), options.guidance(level, depth - 1), dtype=torch.float64)
        probs_BQV = guided_probs(logits_RQV, B, scale_BQ, options, prompt.allowed).cpu()
        for b, n in enumerate(counts):
            if n == 0:
                continue
            tok_Q = draw(probs_BQV[b, :n], gens[b])
            at = int(lengths_B[b])
            tokens_BN[b, at:at + n] = tok_Q
            logprobs_BN[b, at:at + n] = probs_BQV[b, :n].gather(-1, tok_Q[:, None]).squeeze(-1).log()
            children, parent_in_level = child_nodes(nodes[b], (tok_Q - code_start).numpy())
            nodes[b], parents[b] = children, at + parent_in_level
            lengths_B[b] += n
            passes_B[b] += 1
    return Generation(tokens_BN.to(dev), logprobs_BN.to(dev), forward_passes, passes_B.to(dev),
                      lengths=lengths_B.to(dev))


def _run(model: Transformer, input_RT: torch.Tensor, coords_RTA: torch.Tensor, group_RT: torch.Tensor,
         begin_R: torch.Tensor, width: int, cache, dev) -> torch.Tensor:
    """Logits ``(R, width, V)`` of each row's positions ``[begin, begin + width)``: with the KV cache only
    those positions run (the cached tree before them is visible, unused slots are not); without it each row
    runs from its start and the positions are gathered."""
    R = input_RT.shape[0]
    pos_RW = begin_R[:, None] + torch.arange(width)
    rows_R1 = torch.arange(R)[:, None]
    if cache is not None:
        logits, _ = model(input_RT[rows_R1, pos_RW].to(dev), coords_RTA[rows_R1, pos_RW].to(dev),
                          group_RT[rows_R1, pos_RW].to(dev), cache=cache, start=begin_R.to(dev))
        return logits
    end = int(pos_RW.max()) + 1
    logits, _ = model(input_RT[:, :end].to(dev), coords_RTA[:, :end].to(dev), group_RT[:, :end].to(dev))
    return torch.gather(logits, 1, pos_RW.to(dev)[:, :, None].expand(-1, -1, logits.shape[-1]))
