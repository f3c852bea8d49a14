"""How a sample's tokens become model inputs under a paradigm: one factorization for training and sampling.

Every paradigm is "predict the next *group* from the context and all earlier
groups". A document is laid out as ``[context (P tokens)] [N target positions]``;
the target positions are partitioned into groups and a :class:`Plan` fixes,
for each target position ``t``:

- ``group``: 1 + its group index (context is group 0) -> the attention mask;
- ``source[t]``: which target token is fed as *input* at ``t`` (``-1`` = ``BOS``),
  always a token of the previous group, so position ``t`` never sees a token of
  its own group or later;
- ``coords[t]``: the coordinates of the token it *predicts* (``rope.py``).

The output at ``t`` is trained to predict target ``t`` (cross-entropy on every
target position) and sampling draws group ``g`` from one forward over group
``g``'s positions, so both use exactly this factorization.

- ``next_token``: groups of 1, ``source[t] = t - 1``: classic causal LM with
  the input shifted right by one (``BOS`` first).
- ``next_block`` (NBP): groups of ``block_size``, ``source[t] = t - B``: block
  ``k``'s tokens are the inputs that predict block ``k + 1`` at the same offsets,
  bidirectional inside a block, causal across blocks.
- ``next_scale`` (VAR): one group per scale; scale 1's inputs are ``BOS``
  (after the class token: VAR's start embedding), and every cell also attends
  all coarser scales. The input at a cell of scale ``k`` is, with a
  :class:`ScaleInput` attached to the plan (VAR's own input), the accumulated
  reconstruction of scales ``< k`` area-downsampled to scale ``k``, as code
  vectors of the tokenizer's codebook that the model projects
  (``Transformer.feat_proj``); without one, the token of scale ``k - 1`` at
  the same place (``source``: nearest-neighbour upsampling of the coarser map).
- ``next_level`` (G3PT): one group per octree level, each cell reading its parent's mask at its 3-D cell
  coordinates; the groups follow each tree's own tokens, so ``levels.OctreePlan.plan_of`` builds its plans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import PARADIGMS, ModelConfig
from .vocab import BOS, PAD

IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class ScaleInput:
    """VAR's next-scale input for one tokenizer: ``features_BND = mix_NN @ codebook_KD[ids_BN - code_start]``.

    ``mix_NN`` comes from the tokenizer (``MultiScaleVQ.next_scale_input_mix``):
    the rows of scale ``k`` read the codes of scales ``< k`` (accumulate, then
    area-downsample), so a position never sees its own scale. ``codebook_KD``
    is the tokenizer's codebook, zero-padded to the model's ``feature_dim``;
    ``code_start`` is where its codes begin in the model's vocabulary.
    """

    codebook_KD: torch.Tensor
    mix_NN: torch.Tensor
    code_start: int

    @property
    def feature_dim(self) -> int:
        return int(self.codebook_KD.shape[1])

    def padded(self, feature_dim: int) -> ScaleInput:
        """The same input with code vectors zero-padded to ``feature_dim`` (one width for every modality)."""
        K, D = self.codebook_KD.shape
        if D > feature_dim:
            raise ValueError(f"code vectors of {D} values do not fit feature_dim {feature_dim}")
        codebook = torch.cat([self.codebook_KD.float(), torch.zeros(K, feature_dim - D)], dim=1)
        return ScaleInput(codebook, self.mix_NN.float(), self.code_start)

    def features(self, ids_BN: torch.Tensor) -> torch.Tensor:
        """``features_BND`` of the known target tokens (global ids); rows read only earlier scales' tokens.

        Ids outside the codebook (PAD in not-yet-sampled slots) read a zero vector: the mix never reads
        them for the scales that are being run.
        """
        local_BN = ids_BN.long() - self.code_start
        valid_BN = (local_BN >= 0) & (local_BN < self.codebook_KD.shape[0])
        codebook = self.codebook_KD.to(ids_BN.device)
        vectors_BND = codebook[local_BN.clamp(0, codebook.shape[0] - 1)] * valid_BN.unsqueeze(-1)
        return torch.matmul(self.mix_NN.to(ids_BN.device), vectors_BND)


@dataclass(frozen=True, eq=False)
class Plan:
    """The per-position structure of one document's ``N`` target tokens (see the module docstring)."""

    paradigm: str
    group_sizes: tuple[int, ...]
    source_N: torch.Tensor
    coords_NA: torch.Tensor
    scale_input: ScaleInput | None = None

    def with_scale_input(self, scale_input: ScaleInput | None) -> Plan:
        """This plan fed VAR's accumulated input (``None``: the parent-token input)."""
        if scale_input is not None and (self.paradigm != "next_scale"
                                        or tuple(scale_input.mix_NN.shape) != (self.n_tokens, self.n_tokens)):
            raise ValueError(f"a scale input of {tuple(scale_input.mix_NN.shape)} does not fit a {self.paradigm} "
                             f"plan of {self.n_tokens} tokens; it applies to next_scale plans of its tokenizer")
        return Plan(self.paradigm, self.group_sizes, self.source_N, self.coords_NA, scale_input)

    def prefix(self, n_tokens: int) -> Plan:
        """The plan of a document that holds only the first ``n_tokens`` of this one's: FlexVAR's smaller
        sizes, whose scales are this plan's first ones (``flexvq``). Positions, inputs and coordinates are
        this plan's, so a scale means the same at every size; a scale input keeps the leading block of its
        mix (no scale reads a finer one). A next_scale prefix ends on a scale."""
        if n_tokens == self.n_tokens:
            return self
        bounds = self.group_bounds
        if not 0 < n_tokens < self.n_tokens:
            raise ValueError(f"a prefix of {n_tokens} tokens does not fit a plan of {self.n_tokens}")
        if self.paradigm == "next_scale" and n_tokens not in bounds:
            raise ValueError(f"{n_tokens} tokens end inside a scale; a size's tokens end at one of {bounds[1:]}")
        whole = [n for n, end in zip(self.group_sizes, bounds[1:]) if end <= n_tokens]
        sizes = (*whole, n_tokens - sum(whole)) if sum(whole) < n_tokens else tuple(whole)
        scale_input = None
        if self.scale_input is not None:
            scale_input = ScaleInput(self.scale_input.codebook_KD, self.scale_input.mix_NN[:n_tokens, :n_tokens],
                                     self.scale_input.code_start)
        return Plan(self.paradigm, sizes, self.source_N[:n_tokens], self.coords_NA[:n_tokens], scale_input)

    @property
    def feature_mask_N(self) -> torch.Tensor:
        """Positions whose input is a feature vector (every scale but the first) under a scale input."""
        if self.scale_input is None:
            return torch.zeros(self.n_tokens, dtype=torch.bool)
        return self.source_N >= 0

    @property
    def n_tokens(self) -> int:
        return int(self.source_N.shape[0])

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def group_bounds(self) -> list[int]:
        """Target index where each group starts, plus ``N``."""
        out = [0]
        for n in self.group_sizes:
            out.append(out[-1] + n)
        return out

    @property
    def group_N(self) -> torch.Tensor:
        """0-based group index of every target position."""
        return torch.repeat_interleave(torch.arange(self.n_groups), torch.tensor(self.group_sizes))

    def group_at(self, n_known: int) -> int:
        """The group that starts at target index ``n_known`` (a prefix must end on a group boundary)."""
        bounds = self.group_bounds
        if n_known not in bounds:
            raise ValueError(f"a prefix of {n_known} tokens ends inside a group of the {self.paradigm} plan; "
                             f"prefix lengths must be one of {bounds}")
        return bounds.index(n_known)

    def inputs(self, targets_BN: torch.Tensor, bos_id: int = BOS) -> torch.Tensor:
        """``input_ids_BN``: each position's source token (``bos_id`` where the source is -1)."""
        source_N = self.source_N.to(targets_BN.device)
        gathered_BN = targets_BN[:, source_N.clamp_min(0)]
        return torch.where(source_N >= 0, gathered_BN, torch.full_like(gathered_BN, bos_id))


def context_coords(P: int, n_axes: int) -> torch.Tensor:
    """Coordinates ``(P, n_axes)`` of a document's context: the tag and class at the origin, the prompt
    positions that follow (``VocabLayout.context``) as a 1-D sequence on the level axis before the targets
    (levels -1, -2, ...: position ``j`` at ``-1 - j``), so a prompt's word order reaches the model, its tokens
    never sit on a target's coordinates, and a word relates to every image position alike on the grid axes."""
    coords = torch.zeros(P, n_axes)
    if P > 2:
        coords[2:, 0] = -1.0 - torch.arange(P - 2, dtype=torch.float32)
    return coords


def _grid_cells(shape: Sequence[int]) -> torch.Tensor:
    """Integer cell coordinates ``(prod(shape), len(shape))`` in row-major order."""
    axes = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=1)


def _pad_axes(coords_NK: torch.Tensor, n_axes: int) -> torch.Tensor:
    if coords_NK.shape[1] > n_axes:
        raise ValueError(f"tokens have {coords_NK.shape[1]} coordinates (level + grid axes) but the model has "
                         f"rope_axes={n_axes}; raise rope_axes to {coords_NK.shape[1]}")
    pad = torch.zeros(coords_NK.shape[0], n_axes - coords_NK.shape[1], dtype=coords_NK.dtype)
    return torch.cat([coords_NK, pad], dim=1)


def make_plan(paradigm: str, *, grid: Sequence[int] | None = None,
              scales: Sequence[Sequence[int] | int] | None = None, n_tokens: int | None = None,
              block_size: int = 1, n_axes: int = 4) -> Plan:
    """A plan for tokens laid out as one grid, a scale pyramid (coarse -> fine) or a 1-D sequence.

    Exactly one of ``grid`` (e.g. ``(8, 8)``, ``(T, H, W)``), ``scales`` (grid
    shapes per scale, as the msvq tokenizer's ``layout()['scales']``) or
    ``n_tokens`` is given. Coordinates are ``(level, axis_1, ...)`` padded with
    zeros to ``n_axes``; scale cells sit at their centres in the finest grid's units.
    """
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm {paradigm!r} is unknown; use one of {', '.join(PARADIGMS)}")
    if sum(x is not None for x in (grid, scales, n_tokens)) != 1:
        raise ValueError("give exactly one of grid=, scales= or n_tokens=")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if paradigm == "next_level":
        raise ValueError("next_level plans follow each octree's own levels; build them from the tokens with "
                         "levels.OctreePlan(depth, n_tokens).plan_of(tokens)")
    if scales is not None:
        shapes = [tuple([s, s] if isinstance(s, int) else s) for s in scales]
        if not shapes or len({len(s) for s in shapes}) != 1:
            raise ValueError(f"scales must be a non-empty list of grid shapes of one rank, got {scales}")
        finest = shapes[-1]
        rows = []
        for k, shape in enumerate(shapes):
            cells = _grid_cells(shape).double()
            centres = (cells + 0.5) * torch.tensor(finest, dtype=torch.float64) / torch.tensor(shape) - 0.5
            rows.append(torch.cat([torch.full((cells.shape[0], 1), float(k), dtype=torch.float64), centres], 1))
        coords = torch.cat(rows)
    else:
        if paradigm == "next_scale":
            raise ValueError("next_scale needs scales=[...] (grid shapes coarse -> fine), e.g. from an msvq tokenizer")
        shape = tuple(grid) if grid is not None else (int(n_tokens),)
        shapes = [shape]
        cells = _grid_cells(shape).double()
        coords = torch.cat([torch.zeros(cells.shape[0], 1, dtype=torch.float64), cells], 1)
    coords_NA = _pad_axes(coords, n_axes).float()
    N = coords_NA.shape[0]
    if N < 1:
        raise ValueError("a plan needs at least one token")

    if paradigm == "next_token":
        if block_size != 1:
            raise ValueError("next_token predicts one token at a time; use block_size=1 or paradigm next_block")
        sizes = (1,) * N
        source = torch.arange(N) - 1
    elif paradigm == "next_block":
        sizes = tuple(min(block_size, N - s) for s in range(0, N, block_size))
        source = torch.arange(N) - block_size
    elif paradigm == "masked":
        if block_size != 1:
            raise ValueError("masked predicts every masked token of one group at once; use block_size=1")
        sizes = (N,)
        source = torch.arange(N)
    else:
        sizes = tuple(math.prod(s) for s in shapes)
        parts, offset = [torch.full((sizes[0],), -1)], 0
        for prev, cur, n_prev in zip(shapes, shapes[1:], sizes, strict=False):
            cells = _grid_cells(cur)
            parent = torch.div(cells * torch.tensor(prev), torch.tensor(cur), rounding_mode="floor")
            strides = torch.tensor([math.prod(prev[d + 1:]) for d in range(len(prev))])
            parts.append(offset + (parent * strides).sum(1))
            offset += n_prev
        source = torch.cat(parts)
    return Plan(paradigm=paradigm, group_sizes=sizes, source_N=source.long().clamp_min(-1), coords_NA=coords_NA)


def known_cells(shapes: Sequence[Sequence[int]], keep: Any) -> torch.Tensor:
    """Which tokens of a layout lie wholly in the kept region: ``(N,)`` bool over the tokens of ``shapes``
    (one grid, or the scales coarse -> fine), for ``keep`` a boolean array over the samples' pixels (or voxels)
    of the same rank. A cell of a ``n``-cell axis over ``S`` pixels covers ``[i S / n, (i + 1) S / n)``; a token
    is known only when every pixel it covers is kept (in-painting keeps it exactly)."""
    import numpy as np

    keep = np.asarray(keep, dtype=bool)
    out = []
    for shape in shapes:
        shape = tuple(int(n) for n in shape)
        if len(shape) != keep.ndim:
            raise ValueError(f"a mask of {keep.ndim} axes {keep.shape} does not fit tokens on a grid of "
                             f"{len(shape)} axes {shape}")
        cells = np.zeros(shape, dtype=bool)
        for idx in np.ndindex(*shape):
            block = tuple(slice(i * S // n, -(-(i + 1) * S // n)) for i, S, n in zip(idx, keep.shape, shape))
            cells[idx] = bool(keep[block].all())
        out.append(cells.reshape(-1))
    return torch.from_numpy(np.concatenate(out))


def plan_for(config: ModelConfig, *, grid: Sequence[int] | None = None,
             scales: Sequence[Sequence[int] | int] | None = None, n_tokens: int | None = None) -> Plan:
    """The plan of ``config``'s paradigm, block size and coordinate axes for one token layout."""
    return make_plan(config.paradigm, grid=grid, scales=scales, n_tokens=n_tokens, block_size=config.block_size,
                     n_axes=config.rope_axes)


def plan_from_layout(paradigm: str, layout: dict[str, Any], *, block_size: int = 1, n_axes: int = 4) -> Plan:
    """A plan from a tokenizer's ``layout()``: ``scales`` (msvq) or ``grid`` (patch_vq, vqvae)."""
    if layout.get("scales"):
        return make_plan(paradigm, scales=layout["scales"], block_size=block_size, n_axes=n_axes)
    if layout.get("grid"):
        return make_plan(paradigm, grid=layout["grid"], block_size=block_size, n_axes=n_axes)
    raise ValueError("this tokenizer layout has no fixed grid (variable-length tokens); build one plan per "
                     "sample with make_plan(paradigm, n_tokens=len(tokens))")


@dataclass
class ModelInputs:
    """A batch of laid-out sequences: everything the model's forward takes.

    ``target_ids`` is ``IGNORE_INDEX`` where no loss is taken (context, padding);
    ``doc_ids`` is -1 on padding, or None when every row is one document.
    ``features`` replace the token embedding where ``feature_mask`` is set
    (VAR's next-scale input, :class:`ScaleInput`); None when no position has one.
    """

    input_ids: torch.Tensor   # (B, L) long
    target_ids: torch.Tensor  # (B, L) long
    coords: torch.Tensor      # (B, L, A) float
    group_ids: torch.Tensor   # (B, L) long
    doc_ids: torch.Tensor | None = None  # (B, L) long
    features: torch.Tensor | None = None      # (B, L, D) float
    feature_mask: torch.Tensor | None = None  # (B, L) bool

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(*(t.to(device) if t is not None else None for t in
                             (self.input_ids, self.target_ids, self.coords, self.group_ids, self.doc_ids,
                              self.features, self.feature_mask)))

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """``model(**inputs.as_kwargs())`` -> ``(logits, loss)``."""
        return {"input_ids_BL": self.input_ids, "coords_BLA": self.coords, "group_ids_BL": self.group_ids,
                "doc_ids_BL": self.doc_ids, "targets_BL": self.target_ids, "features_BLD": self.features,
                "feature_mask_BL": self.feature_mask}


def target_documents(inputs: ModelInputs) -> list[tuple[int, torch.Tensor]]:
    """Each document's row and target positions (in order), row by row, documents in id order: what the
    training transforms (MaskGIT's masks, TokenUnify's objectives) draw for, one document at a time."""
    scored_BL = inputs.target_ids != IGNORE_INDEX
    docs_BL = inputs.doc_ids if inputs.doc_ids is not None else torch.zeros_like(inputs.target_ids)
    found = []
    for b in range(scored_BL.shape[0]):
        for d in torch.unique(docs_BL[b][scored_BL[b]]).tolist():
            found.append((b, torch.nonzero(scored_BL[b] & (docs_BL[b] == d)).squeeze(1)))
    return found


def batch_inputs(plan: Plan, targets_BN: torch.Tensor, context_BP: torch.Tensor, *,
                 bos_id: int = BOS) -> ModelInputs:
    """Rows of one document each, same plan: ``(B, P + N)`` inputs (fixed-length samples, no packing)."""
    B, N = targets_BN.shape
    if N != plan.n_tokens:
        raise ValueError(f"targets have {N} tokens but the plan expects {plan.n_tokens}")
    P = context_BP.shape[1]
    dev = targets_BN.device
    input_ids = torch.cat([context_BP.long(), plan.inputs(targets_BN.long(), bos_id)], dim=1)
    target_ids = torch.cat([torch.full_like(context_BP, IGNORE_INDEX).long(), targets_BN.long()], dim=1)
    coords_LA = torch.cat([context_coords(P, plan.coords_NA.shape[1]), plan.coords_NA]).to(dev)
    group_L = torch.cat([torch.zeros(P, dtype=torch.long), plan.group_N + 1]).to(dev)
    features = feature_mask = None
    if plan.scale_input is not None:
        features_BND = plan.scale_input.features(targets_BN)
        features = torch.cat([features_BND.new_zeros(B, P, features_BND.shape[2]), features_BND], dim=1)
        feature_mask = torch.cat([torch.zeros(P, dtype=torch.bool), plan.feature_mask_N]).to(dev).expand(B, -1)
    return ModelInputs(input_ids, target_ids, coords_LA.expand(B, -1, -1).contiguous(),
                       group_L.expand(B, -1).contiguous(), None, features, feature_mask)


def pack_documents(rows: Sequence[Sequence[tuple[Plan, torch.Tensor, torch.Tensor]]], seq_len: int, *,
                   bos_id: int = BOS, pad_id: int = PAD) -> ModelInputs:
    """Pack documents ``(plan, targets_N, context_P)`` row by row into ``(len(rows), seq_len)``.

    Each document occupies ``P + N`` positions and gets its own document id,
    so attention never crosses documents (``masks.attention_mask``).
    """
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    target_ids = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    coords, group_ids = None, torch.zeros((n, seq_len), dtype=torch.long)
    doc_ids = torch.full((n, seq_len), -1, dtype=torch.long)
    widths = {p.scale_input.feature_dim for docs in rows for p, _t, _c in docs if p.scale_input is not None}
    if len(widths) > 1:
        raise ValueError(f"packed documents' scale inputs have different widths {sorted(widths)}; pad them to "
                         "one feature_dim (ScaleInput.padded)")
    features = torch.zeros((n, seq_len, widths.pop())) if widths else None
    feature_mask = torch.zeros((n, seq_len), dtype=torch.bool) if features is not None else None
    for r, docs in enumerate(rows):
        at = 0
        for d, (plan, targets_N, context_P) in enumerate(docs):
            one = batch_inputs(plan, targets_N.reshape(1, -1), context_P.reshape(1, -1), bos_id=bos_id)
            L = one.input_ids.shape[1]
            if at + L > seq_len:
                raise ValueError(f"row {r}: documents need {at + L} positions, more than seq_len {seq_len}")
            if coords is None:
                coords = torch.zeros((n, seq_len, one.coords.shape[2]))
            elif coords.shape[2] != one.coords.shape[2]:
                raise ValueError("packed documents must share the number of coordinate axes")
            sl = slice(at, at + L)
            input_ids[r, sl], target_ids[r, sl] = one.input_ids[0], one.target_ids[0]
            coords[r, sl], group_ids[r, sl], doc_ids[r, sl] = one.coords[0], one.group_ids[0], d
            if one.features is not None:
                features[r, sl], feature_mask[r, sl] = one.features[0], one.feature_mask[0]
            at += L
    if coords is None:
        raise ValueError("pack_documents got no documents")
    return ModelInputs(input_ids, target_ids, coords, group_ids, doc_ids, features, feature_mask)
