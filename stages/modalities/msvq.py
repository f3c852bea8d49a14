"""msvq: VAR-style multi-scale residual quantization over normalized pixel patches.

The feature map is the sample cut into ``patch`` patches (a fixed, invertible
map: no encoder to train). For each scale ``s`` in ``scales`` (coarse -> fine)
the residual ``f - f_hat`` is area-downsampled to an ``s`` grid, every cell is
replaced by its nearest code of one shared codebook, and the codes are
upsampled (bicubic in 2-D, linear per axis in 3-D) back to the full grid and
added to ``f_hat`` (Tian et al., VAR,
2024, without the learned encoder/decoder). Tokens are ordered coarse -> fine;
``layout()['boundaries']`` gives where each scale starts, which is what a
next-scale AR model needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import (
    FixedLengthTokenizer,
    TokenizerError,
    as_batch,
    check_input_shape,
    check_tokens,
)
from .codebook import CodebookState, kmeans, nearest_code
from .patches import axes_for, grid_of, patchify, unpatchify


def _scale_shape(scale: int | Sequence[int], nd: int) -> tuple[int, ...]:
    return tuple(int(s) for s in scale) if isinstance(scale, Sequence) else (int(scale),) * nd


def _kron(mats: list[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


class MultiScaleVQ(CodebookState, FixedLengthTokenizer):
    """Multi-scale residual VQ with a shared codebook.

    ``scales`` are grid sides per scale (an int for a cube/square, or one side
    per axis); the last may be smaller than the patch grid, whose side is
    ``input side / patch``. ``fit_rounds`` alternates k-means with re-computing
    the residuals the current codebook leaves, so the codebook fits the
    residuals it will actually see at encode time. ``device`` is where encode
    and decode run (``cpu``, ``cuda`` or ``auto``); fits run on the CPU.
    """

    type = "msvq"
    #: where it runs is not what it is: the device stays out of config() and so out of the digest
    runtime_options = ("device",)

    def __init__(self, *, input_shape: Sequence[int], patch: Sequence[int], scales: Sequence[int | Sequence[int]],
                 codebook_size: int = 512, modality: str = "image", seed: int = 0, fit_vectors: int = 200_000,
                 fit_iters: int = 100, fit_rounds: int = 3, device: str = "cpu"):
        self.input_shape = tuple(int(s) for s in input_shape)
        self.patch = tuple(int(p) for p in patch)
        self.channels = self.input_shape[0]
        self.grid = grid_of(self.input_shape[1:], self.patch, self.type)
        self.modality = modality
        self.axes = ("scale", *axes_for(modality, len(self.patch)))
        nd = len(self.patch)
        self.scales = [_scale_shape(s, nd) for s in scales]
        if not self.scales:
            raise TokenizerError("msvq needs at least one scale", fix="set scales, e.g. [1, 2, 4, 8]")
        for s in self.scales:
            if len(s) != nd or any(a < 1 or a > g for a, g in zip(s, self.grid, strict=True)):
                raise TokenizerError(f"msvq scale {s} must have {nd} sides within the patch grid {self.grid}",
                                     fix="use scales no larger than input side / patch")
        self.codebook_size = int(codebook_size)
        self.seed, self.fit_vectors = int(seed), int(fit_vectors)
        self.fit_iters, self.fit_rounds = int(fit_iters), int(fit_rounds)
        self.dim = self.channels * math.prod(self.patch)
        self.init_state(self.dim, device)
        self._mats: dict[tuple[tuple[int, ...], torch.device],
                         tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    # ------------------------------------------------------------ properties

    @property
    def boundaries(self) -> list[int]:
        """Token offset where each scale starts, plus the total at the end."""
        out = [0]
        for s in self.scales:
            out.append(out[-1] + math.prod(s))
        return out

    @property
    def tokens_per_sample(self) -> int:
        return self.boundaries[-1]

    def config(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "patch": list(self.patch),
                "scales": [list(s) for s in self.scales], "codebook_size": self.codebook_size,
                "modality": self.modality, "seed": self.seed, "fit_vectors": self.fit_vectors,
                "fit_iters": self.fit_iters, "fit_rounds": self.fit_rounds}

    def layout(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "grid": list(self.grid), "patch": list(self.patch),
                "scales": [list(s) for s in self.scales], "boundaries": self.boundaries,
                "order": "coarse to fine; row-major within a scale"}

    def positions(self, idx_L: torch.Tensor | None = None) -> torch.Tensor:
        rows = []
        for k, s in enumerate(self.scales):
            axes = torch.meshgrid(*[torch.arange(a) for a in s], indexing="ij")
            cells = torch.stack([a.reshape(-1) for a in axes], dim=1)
            rows.append(torch.cat([torch.full((cells.shape[0], 1), k), cells], dim=1))
        return torch.cat(rows)

    # ------------------------------------------------------------ internals
    #
    # Features stay channels-last, ``f_BLD`` with L the row-major grid (what patchify gives), so the
    # codebook search reads them without a transpose. Area downsampling and bicubic (2-D) or linear
    # (3-D) upsampling are separable linear maps; for the usual grid sizes the whole map is one small
    # dense matrix (the Kronecker product of the per-axis ones) applied as a single matmul, which
    # equals F.adaptive_avg_pool / F.interpolate (to float rounding) at a fraction of their cost.

    def _resamplers(self, scale: tuple[int, ...], device: torch.device
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(down, up) maps between ``scale`` and the patch grid, on ``device``: one dense ``l x L`` /
        ``L x l`` matrix when small (<= 4M entries), else the per-axis matrices. Built on the CPU and
        copied to a GPU, so that both resample with the same numbers."""
        cached = self._mats.get((scale, device))
        if cached is None and device.type != "cpu":
            down, up = self._resamplers(scale, torch.device("cpu"))
            cached = self._mats[(scale, device)] = ([m.to(device) for m in down], [m.to(device) for m in up])
        if cached is None:
            down, up = [], []
            for s, g in zip(scale, self.grid, strict=True):
                down.append(F.adaptive_avg_pool1d(torch.eye(g).view(g, 1, g), s).view(g, s).t().contiguous())
                if len(self.grid) == 2:
                    u = F.interpolate(torch.eye(s).view(s, 1, 1, s), size=(1, g), mode="bicubic", align_corners=False)
                else:
                    u = F.interpolate(torch.eye(s).view(s, 1, s), size=g, mode="linear", align_corners=False)
                up.append(u.reshape(s, g).t().contiguous())
            if math.prod(scale) * math.prod(self.grid) <= 1 << 22:
                down, up = [_kron(down)], [_kron(up)]
            cached = self._mats[(scale, device)] = (down, up)
        return cached

    def _resample(self, t_BLD: torch.Tensor, src: tuple[int, ...], mats: list[torch.Tensor]) -> torch.Tensor:
        if len(mats) == 1:
            return torch.matmul(mats[0], t_BLD)
        b, _, d = t_BLD.shape
        spec = "ai,bj,nijd->nabd" if len(src) == 2 else "ai,bj,ck,nijkd->nabcd"
        return torch.einsum(spec, *mats, t_BLD.reshape(b, *src, d)).reshape(b, -1, d)

    def _down(self, f_BLD: torch.Tensor, scale: tuple[int, ...]) -> torch.Tensor:
        """``r_BlD``: area average of the full-grid map onto ``scale``."""
        if scale == self.grid:
            return f_BLD
        return self._resample(f_BLD, self.grid, self._resamplers(scale, f_BLD.device)[0])

    def _up(self, q_BlD: torch.Tensor, scale: tuple[int, ...]) -> torch.Tensor:
        """``q_BLD``: ``scale`` codes interpolated back onto the full grid."""
        if scale == self.grid:
            return q_BlD
        return self._resample(q_BlD, scale, self._resamplers(scale, q_BlD.device)[1])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """``f_BLD``: normalized patches, row-major over the patch grid."""
        check_input_shape(x, self.input_shape, self.type)
        view = [1, self.channels] + [1] * len(self.patch)
        x = x.float().to(self.mean_C.device)
        return patchify((x - self.mean_C.view(view)) / self.std_C.view(view), self.patch)

    def _pixels(self, f_BLD: torch.Tensor) -> torch.Tensor:
        view = [1, self.channels] + [1] * len(self.patch)
        x = unpatchify(f_BLD, self.grid, self.patch, self.channels)
        return x * self.std_C.view(view) + self.mean_C.view(view)

    def _quantize(self, r_BlD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``idx_Bl``, ``q_BlD``) for one scale's residual."""
        b, _, d = r_BlD.shape
        idx_N = nearest_code(r_BlD.reshape(-1, d), self.codebook_KD, self.code_sq_K)
        return idx_N.view(b, -1), self.codebook_KD[idx_N].view(b, -1, d)

    def _residuals(self, f_BLD: torch.Tensor, quantized: bool) -> torch.Tensor:
        """All scales' residual vectors ``r_ND``; with ``quantized=False`` the ideal pyramid (fit round 0)."""
        f_hat = torch.zeros_like(f_BLD)
        out = []
        for s in self.scales:
            r_BlD = self._down(f_BLD - f_hat, s)
            out.append(r_BlD.reshape(-1, self.dim))
            q_BlD = self._quantize(r_BlD)[1] if quantized else r_BlD
            f_hat = f_hat + self._up(q_BlD, s)
        return torch.cat(out)

    # --------------------------------------------------------------- fitting

    @torch.no_grad()
    def fit(self, samples: Sequence[np.ndarray] | torch.Tensor) -> MultiScaleVQ:
        """Channel statistics, then ``fit_rounds`` of k-means on the residuals of every scale."""
        x = as_batch(samples).cpu()
        check_input_shape(x, self.input_shape, self.type)
        dims = [0] + list(range(2, x.dim()))
        self.mean_C = x.mean(dims)
        self.std_C = x.std(dims).clamp_min(1e-6)
        f_BLD = self._features(x)
        g = torch.Generator().manual_seed(self.seed)
        codebook = None
        for r in range(max(1, self.fit_rounds)):
            r_ND = self._residuals(f_BLD, quantized=r > 0)
            if r_ND.shape[0] > self.fit_vectors:
                r_ND = r_ND[torch.randperm(r_ND.shape[0], generator=g)[: self.fit_vectors]]
            codebook = kmeans(r_ND, self.codebook_size, iters=self.fit_iters, seed=self.seed + r, init_KD=codebook)
            self.codebook_KD, self.code_sq_K = codebook, codebook.pow(2).sum(1)
        self.place()
        self.fit_info = {"samples": int(x.shape[0]), "rounds": max(1, self.fit_rounds)}
        return self

    # ------------------------------------------------------ encode / decode

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x_BC<spatial>`` -> ``idx_BL`` (scales concatenated coarse -> fine)."""
        f_BLD = self._features(x)
        f_hat = torch.zeros_like(f_BLD)
        tokens = []
        for s in self.scales:
            idx_Bl, q_BlD = self._quantize(self._down(f_BLD - f_hat, s))
            tokens.append(idx_Bl)
            f_hat = f_hat + self._up(q_BlD, s)
        return torch.cat(tokens, dim=1)

    @torch.no_grad()
    def next_scale_input_mix(self) -> torch.Tensor:
        """``mix_NN``: VAR's next-scale input as a linear map of the code vectors of every token.

        VAR feeds scale ``k`` the accumulated reconstruction of scales ``< k``
        (``f_hat``, each scale's codes upsampled to the full grid and summed)
        area-downsampled to scale ``k``'s grid. That is linear in the code
        vectors, so ``input_ND = mix_NN @ codebook_KD[idx_N]``: the block of
        rows of scale ``k`` and columns of scale ``j < k`` is ``down_k @ up_j``;
        scale 0's rows are zero (its input is the start token). Built with this
        tokenizer's own resamplers, so it matches ``encode`` exactly.
        """
        bounds, N = self.boundaries, self.tokens_per_sample
        mix_NN = torch.zeros(N, N)
        for j, sj in enumerate(self.scales[:-1]):
            n_j = math.prod(sj)
            up_1Lj = self._up(torch.eye(n_j).unsqueeze(0), sj)   # every code of scale j on the full grid
            for k in range(j + 1, len(self.scales)):
                mix_NN[bounds[k]:bounds[k + 1], bounds[j]:bounds[j + 1]] = self._down(up_1Lj, self.scales[k])[0]
        return mix_NN

    @torch.no_grad()
    def decode(self, idx_BL: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """``idx_BL`` -> ``x_BC<spatial>``; ``upto=k`` reconstructs from the first k scales only."""
        check_tokens(idx_BL, self.tokens_per_sample, self.codebook_size, self.type)
        b, idx_BL = idx_BL.shape[0], idx_BL.to(self.device)
        f_hat = torch.zeros(b, math.prod(self.grid), self.dim, device=self.device)
        bounds = self.boundaries
        for k, s in enumerate(self.scales[:upto]):
            f_hat = f_hat + self._up(self.codebook_KD[idx_BL[:, bounds[k]:bounds[k + 1]].long()], s)
        return self._pixels(f_hat)
