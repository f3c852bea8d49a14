"""octree: a point cloud as child-occupancy bytes of an octree, level by level (coarse -> fine).

Points (normalized into the cube ``[-half_extent, half_extent]^3``; the
point cloud reader's unit-sphere normalization fits in the default cube)
are quantized to a ``2^depth`` voxel grid. Each occupied node of level
``l`` emits one token: the 8-bit mask of its occupied children. Nodes are
visited breadth first and, within a level, in Morton (z-order) order, which
is exactly the order their parents' masks list them; so decoding needs no
other data and is lossless at the leaf resolution: ``decode(encode(x))`` is
the set of voxel centers that ``x`` occupies. The token count varies per
sample; :meth:`OctreeTokenizer.level_boundaries` says where each level starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import Tokenizer, TokenizerError

_CHILD_BITS = np.arange(8, dtype=np.int64)


def morton_encode(q_N3: np.ndarray, bits: int) -> np.ndarray:
    """Interleave integer (x, y, z) coordinates: bit b of x, y, z -> bits 3b+2, 3b+1, 3b of the code."""
    q = q_N3.astype(np.int64)
    code = np.zeros(q.shape[0], dtype=np.int64)
    for b in range(bits):
        code |= ((q[:, 0] >> b) & 1) << (3 * b + 2)
        code |= ((q[:, 1] >> b) & 1) << (3 * b + 1)
        code |= ((q[:, 2] >> b) & 1) << (3 * b)
    return code


def child_nodes(nodes_N: np.ndarray, masks_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One level down: the Morton codes of the children that ``masks_N`` mark occupied, in the order the masks
    list them (the next level's order), and for each child the index of its parent in ``nodes_N``."""
    occupied_N8 = ((np.asarray(masks_N, dtype=np.int64)[:, None] >> _CHILD_BITS) & 1).astype(bool)
    children = ((np.asarray(nodes_N, dtype=np.int64)[:, None] << 3) | _CHILD_BITS)[occupied_N8]
    return children, np.nonzero(occupied_N8)[0]


def morton_decode(code_N: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`morton_encode`: ``q_N3`` integer coordinates."""
    q = np.zeros((code_N.shape[0], 3), dtype=np.int64)
    for b in range(bits):
        q[:, 0] |= ((code_N >> (3 * b + 2)) & 1) << b
        q[:, 1] |= ((code_N >> (3 * b + 1)) & 1) << b
        q[:, 2] |= ((code_N >> (3 * b)) & 1) << b
    return q


class OctreeTokenizer(Tokenizer):
    """Lossless (at ``2^depth`` voxels per side) octree occupancy tokens; vocabulary of 256 byte values."""

    type = "octree"
    learned = False

    def __init__(self, *, depth: int = 8, half_extent: float = 1.0, tolerance: float = 1e-4):
        if not 1 <= int(depth) <= 20:
            raise TokenizerError(f"octree depth {depth} is out of range", fix="use a depth from 1 to 20")
        self.depth, self.half_extent, self.tolerance = int(depth), float(half_extent), float(tolerance)
        self.fit_info: dict[str, Any] = {}

    # ------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def tokens_per_sample(self) -> None:
        return None

    @property
    def voxel_size(self) -> float:
        return 2 * self.half_extent / (1 << self.depth)

    def config(self) -> dict[str, Any]:
        return {"depth": self.depth, "half_extent": self.half_extent, "tolerance": self.tolerance}

    def layout(self) -> dict[str, Any]:
        return {"axes": ["level", "x", "y", "z"], "depth": self.depth, "variable_length": True,
                "order": "level by level (coarse to fine), Morton order within a level",
                "boundaries": "per sample: level_boundaries(tokens)"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        return None

    # --------------------------------------------------------------- encode

    def voxelize(self, xyz_N3: np.ndarray) -> np.ndarray:
        """Sorted unique Morton codes of the occupied leaf voxels (checks the cloud first)."""
        xyz = np.asarray(xyz_N3, dtype=np.float64)
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise TokenizerError(f"octree expects points of shape (N, 3), got {xyz.shape}",
                                 fix="pass xyz coordinates only")
        if xyz.shape[0] == 0:
            raise TokenizerError("octree cannot encode an empty point cloud", fix="drop empty clouds in the reader")
        if not np.isfinite(xyz).all():
            raise TokenizerError("octree got NaN or infinite coordinates", fix="clean the cloud in the reader")
        h = self.half_extent
        if np.abs(xyz).max() > h * (1 + self.tolerance):
            raise TokenizerError(f"points lie outside the octree cube [-{h}, {h}]^3 (max |coordinate| "
                                 f"{np.abs(xyz).max():.4g})", fix="normalize the cloud (reader normalize='unit_sphere')")
        side = 1 << self.depth
        q = np.floor((xyz + h) / (2 * h) * side).astype(np.int64).clip(0, side - 1)
        return np.unique(morton_encode(q, self.depth))

    def encode_one(self, xyz_N3: np.ndarray) -> np.ndarray:
        """``xyz_N3`` -> ``idx_L`` (int64 occupancy bytes, levels 0..depth-1)."""
        leaves = self.voxelize(xyz_N3)
        tokens = []
        for level in range(self.depth):
            children = np.unique(leaves >> (3 * (self.depth - level - 1)))  # sorted nodes of level + 1
            parents = children >> 3
            starts = np.flatnonzero(np.r_[True, parents[1:] != parents[:-1]])
            tokens.append(np.bitwise_or.reduceat(np.left_shift(1, children & 7), starts))
        return np.concatenate(tokens).astype(np.int64)

    # --------------------------------------------------------------- decode

    def _walk(self, idx_L: np.ndarray) -> list[np.ndarray]:
        """Morton codes of the nodes of every level 1..depth, reading the masks in order."""
        idx = np.asarray(idx_L, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 1 or idx.max() > 255):
            raise TokenizerError("octree tokens must be child masks in [1, 255]",
                                 fix="pass token sequences produced by this tokenizer")
        nodes, offset, levels = np.zeros(1, dtype=np.int64), 0, []
        for _ in range(self.depth):
            masks = idx[offset:offset + nodes.size]
            if masks.size != nodes.size:
                raise TokenizerError(f"octree token sequence ends early ({idx.size} tokens)",
                                     fix="pass a complete token sequence")
            offset += nodes.size
            nodes, _parents = child_nodes(nodes, masks)
            levels.append(nodes)
        if offset != idx.size:
            raise TokenizerError(f"octree token sequence has {idx.size - offset} tokens past the leaves",
                                 fix=f"pass a sequence encoded at depth {self.depth}")
        return levels

    def decode_one(self, idx_L: np.ndarray) -> np.ndarray:
        """``idx_L`` -> ``xyz_M3`` float32 voxel centers, in Morton order."""
        leaves = self._walk(idx_L)[-1]
        q = morton_decode(leaves, self.depth)
        return ((q + 0.5) * self.voxel_size - self.half_extent).astype(np.float32)

    def trim(self, idx_L: np.ndarray) -> np.ndarray:
        """The complete tree at the start of a generated sequence (a sampler emits a fixed length).

        Raises :class:`TokenizerError` when the sequence ends before the leaves or holds a token
        that is not a child mask.
        """
        idx = np.asarray(idx_L, dtype=np.int64).reshape(-1)
        nodes, offset = 1, 0
        for level in range(self.depth):
            masks = idx[offset:offset + nodes]
            if masks.size != nodes:
                raise TokenizerError(f"octree sequence ends at level {level} of {self.depth}: {idx.size} tokens "
                                     f"hold no complete tree", fix="sample more tokens (raise `length`)")
            if masks.min() < 1 or masks.max() > 255:
                raise TokenizerError(f"octree token {int(masks.min() if masks.min() < 1 else masks.max())} at "
                                     f"level {level} is not a child mask in [1, 255]")
            offset += nodes
            nodes = int(np.unpackbits(masks.astype(np.uint8)).sum())
        return idx[:offset]

    def level_boundaries(self, idx_L: np.ndarray) -> list[int]:
        """Token offset where each level starts, plus the total: ``depth + 1`` numbers."""
        out = [0, 1]
        for nodes in self._walk(idx_L)[:-1]:
            out.append(out[-1] + int(nodes.size))
        return out

    def positions(self, idx_L: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """``pos_LK`` = (level, x, y, z) of the node each token describes, in that level's grid."""
        if idx_L is None:
            raise TokenizerError("octree positions depend on the tokens", fix="pass the sample's tokens")
        idx = idx_L.cpu().numpy() if isinstance(idx_L, torch.Tensor) else np.asarray(idx_L)
        rows = [np.zeros((1, 4), dtype=np.int64)]
        for level, nodes in enumerate(self._walk(idx)[:-1], start=1):
            rows.append(np.concatenate([np.full((nodes.size, 1), level), morton_decode(nodes, level)], axis=1))
        return torch.from_numpy(np.concatenate(rows))

    # ------------------------------------------------------------ stage API

    def encode_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.encode_one(a) for a in arrays]

    def decode_arrays(self, tokens: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.decode_one(t) for t in tokens]
