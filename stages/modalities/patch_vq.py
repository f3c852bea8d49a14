"""patch_vq: a k-means codebook over normalized pixel patches (2-D, or 3-D for volumes and video tubelets).

The simplest tokenizer that is still a real baseline: one token per
non-overlapping patch, the code the nearest k-means centroid. It needs no
training beyond k-means on a sample, so it is the reference the learned
tokenizers must beat at equal token count. A video tubelet of depth 1
(patch ``(1, p, p)``) is a per-frame image tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import FixedLengthTokenizer, as_batch, check_input_shape, check_tokens
from .codebook import CodebookState, kmeans, nearest_code
from .patches import axes_for, grid_of, grid_positions, patchify, unpatchify


class PatchVQ(CodebookState, FixedLengthTokenizer):
    """One token per patch: the nearest of ``codebook_size`` k-means centroids.

    ``input_shape`` is the sample shape without batch: ``(C, H, W)`` for images,
    ``(C, T, H, W)`` for video, ``(1, D, H, W)`` for volumes; ``patch`` has one
    side per spatial axis. ``device`` is where encode and decode run (``cpu``, ``cuda`` or ``auto``); fits run
    on the CPU.
    """

    type = "patch_vq"
    #: where it runs is not what it is: the device stays out of config() and so out of the digest
    runtime_options = ("device",)

    def __init__(self, *, input_shape: Sequence[int], patch: Sequence[int], codebook_size: int = 512,
                 modality: str = "image", seed: int = 0, fit_vectors: int = 200_000, fit_iters: int = 100,
                 device: str = "cpu"):
        self.input_shape = tuple(int(s) for s in input_shape)
        self.patch = tuple(int(p) for p in patch)
        self.channels = self.input_shape[0]
        self.grid = grid_of(self.input_shape[1:], self.patch, self.type)
        self.modality = modality
        self.axes = axes_for(modality, len(self.patch))
        self.codebook_size = int(codebook_size)
        self.seed, self.fit_vectors, self.fit_iters = int(seed), int(fit_vectors), int(fit_iters)
        self.init_state(self.channels * math.prod(self.patch), device)

    # ------------------------------------------------------------ properties

    @property
    def tokens_per_sample(self) -> int:
        return math.prod(self.grid)

    def config(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "patch": list(self.patch), "codebook_size": self.codebook_size,
                "modality": self.modality, "seed": self.seed, "fit_vectors": self.fit_vectors,
                "fit_iters": self.fit_iters}

    def layout(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "grid": list(self.grid), "patch": list(self.patch),
                "order": "row-major over the grid"}

    def positions(self, idx_L: torch.Tensor | None = None) -> torch.Tensor:
        return grid_positions(self.grid)

    # --------------------------------------------------------------- fitting

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        view = [1, self.channels] + [1] * len(self.patch)
        return (x - self.mean_C.view(view)) / self.std_C.view(view)

    def _denormalize(self, x: torch.Tensor) -> torch.Tensor:
        view = [1, self.channels] + [1] * len(self.patch)
        return x * self.std_C.view(view) + self.mean_C.view(view)

    def fit(self, samples: Sequence[np.ndarray] | torch.Tensor) -> PatchVQ:
        """Channel statistics and the codebook, from at most ``fit_vectors`` patches of ``samples``."""
        x = as_batch(samples).cpu()
        check_input_shape(x, self.input_shape, self.type)
        dims = [0] + list(range(2, x.dim()))
        self.mean_C = x.mean(dims)
        self.std_C = x.std(dims).clamp_min(1e-6)
        z_ND = patchify(self._normalize(x), self.patch).reshape(-1, self.codebook_KD.shape[1])
        if z_ND.shape[0] > self.fit_vectors:
            g = torch.Generator().manual_seed(self.seed)
            z_ND = z_ND[torch.randperm(z_ND.shape[0], generator=g)[: self.fit_vectors]]
        self.codebook_KD = kmeans(z_ND, self.codebook_size, iters=self.fit_iters, seed=self.seed)
        self.code_sq_K = self.codebook_KD.pow(2).sum(1)
        self.place()
        self.fit_info = {"samples": int(x.shape[0]), "vectors": int(z_ND.shape[0])}
        return self

    # ------------------------------------------------------ encode / decode

    def patch_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """``z_BLD``: the normalized patches a codebook lookup compares (split out for benchmarks)."""
        check_input_shape(x, self.input_shape, self.type)
        return patchify(self._normalize(x.float().to(self.device)), self.patch)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x_BC<spatial>`` -> ``idx_BL``."""
        z_BLD = self.patch_vectors(x)
        b, n, d = z_BLD.shape
        return nearest_code(z_BLD.reshape(b * n, d), self.codebook_KD, self.code_sq_K).view(b, n)

    @torch.no_grad()
    def decode(self, idx_BL: torch.Tensor) -> torch.Tensor:
        """``idx_BL`` -> ``x_BC<spatial>`` (the centroids, un-normalized)."""
        check_tokens(idx_BL, self.tokens_per_sample, self.codebook_size, self.type)
        z_BLD = self.codebook_KD[idx_BL.long().to(self.device)]
        return self._denormalize(unpatchify(z_BLD, self.grid, self.patch, self.channels))
