"""flexvq: FlexVAR-style scales, each the token map of the image itself at that scale's resolution.

VAR's scales (``msvq``) quantize *residuals*: scale ``k`` only means something
added to scales ``< k`` and read back on one fixed grid, so a model trained on
them has one output size. FlexVAR (Jiao et al., 2025) drops the residual: the
tokens of scale ``s`` are the image resized to ``s x patch`` pixels, cut into
``patch`` patches and matched to one shared codebook (here a k-means codebook
of normalized pixel patches, as ``patch_vq`` has: no encoder to train). Every
scale is then a picture on its own, so

- an image of any size in ``sizes`` is the prefix of ``scales`` that ends at
  its own grid (``size / patch``): a 16x16 digit's tokens are the first scales
  of a 32x32 one's, one store holds both, and a model trains on both at once;
- decoding reads the last scale only: its token map is the image;
- a model that learned scale 6 as a step towards 32x32 images samples 24x24
  ones by stopping there, a size it never saw as a whole image.

The next-scale input (``next_scale_input_mix``) is FlexVAR's: the code vectors
of scale ``k - 1`` interpolated (bilinear) onto scale ``k``'s cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Tokenizer, TokenizerError, by_shape, full_float32
from .codebook import CodebookState, kmeans, nearest_code
from .patches import patchify, unpatchify


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``16`` or ``[16, 24]`` as ``(h, w)``; anything else is one line."""
    if isinstance(size, int):
        return (int(size), int(size))
    if not isinstance(size, Sequence) or len(size) != 2 or not all(isinstance(n, int) for n in size):
        raise TokenizerError(f"flexvq sizes and scales are a side or [h, w], got {size!r}",
                             fix="write e.g. 16 or [16, 24]")
    return (int(size[0]), int(size[1]))


def _shown(hw: Sequence[int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _interp_matrix(src: int, dst: int) -> torch.Tensor:
    """``dst x src``: bilinear (align_corners=False) interpolation along one axis, as ``F.interpolate`` does."""
    if src == dst:
        return torch.eye(src)
    up = F.interpolate(torch.eye(src).view(src, 1, src), size=dst, mode="linear", align_corners=False)
    return up.reshape(src, dst).t().contiguous()


class FlexScaleVQ(CodebookState, Tokenizer):
    """Images of several sizes as FlexVAR's scales: ground-truth token maps, coarse to fine, no residuals.

    ``sizes`` are the image sizes (side, or ``[h, w]``) it takes; ``scales`` the token grids coarse to
    fine, which must hold every size's grid ``size / patch`` (a size's tokens are the scales up to its
    grid). ``input_shape`` (what the tokenizer stage reads first) gives the channels, and the size when
    ``sizes`` is not set. ``device`` is where encode and decode run; fits run on the CPU.
    """

    type = "flexvq"
    runtime_options = ("device",)
    #: samples per encode call (bounds the memory of a stage task)
    batch_size = 256

    def __init__(self, *, patch: Sequence[int], scales: Sequence[int | Sequence[int]],
                 sizes: Sequence[int | Sequence[int]] | None = None, input_shape: Sequence[int] | None = None,
                 channels: int | None = None, codebook_size: int = 512, modality: str = "image", seed: int = 0,
                 fit_vectors: int = 200_000, fit_iters: int = 100, device: str = "cpu"):
        if modality != "image":
            raise TokenizerError(f"flexvq tokenizes images, not {modality}", fix="use msvq or patch_vq for "
                                                                                f"{modality}")
        if input_shape is not None and len(input_shape) != 3:
            raise TokenizerError(f"flexvq takes images (C, H, W), got samples of shape {tuple(input_shape)}",
                                 fix="read images with an image source")
        self.channels = int(channels if channels is not None else (input_shape[0] if input_shape else 3))
        self.patch = _pair(list(patch)) if len(patch) == 2 else None
        if self.patch is None or min(self.patch) < 1:
            raise TokenizerError(f"flexvq patch must be [p, p] with p >= 1, got {list(patch)}",
                                 fix="give one patch side per image axis, e.g. patch: [4, 4]")
        given = [_pair(s) for s in sizes] if sizes else ([tuple(int(n) for n in input_shape[1:])] if input_shape
                                                          else [])
        if not given:
            raise TokenizerError("flexvq needs the image sizes it takes", fix="set sizes, e.g. sizes: [16, 24, 32]")
        self.sizes = sorted(set(given), key=lambda hw: (hw[0] * hw[1], hw))
        self.scales = [_pair(s) for s in scales]
        if not self.scales:
            raise TokenizerError("flexvq needs at least one scale", fix="set scales, e.g. [1, 2, 3, 4, 6, 8]")
        for a, b in zip(self.scales, self.scales[1:]):
            if b[0] < a[0] or b[1] < a[1] or b == a:
                raise TokenizerError(f"flexvq scales must grow coarse to fine, got {_shown(a)} before {_shown(b)}",
                                     fix="list the scales from the coarsest to the finest")
        for hw in self.sizes:
            if hw[0] % self.patch[0] or hw[1] % self.patch[1]:
                raise TokenizerError(f"flexvq size {_shown(hw)} is not a multiple of patch {list(self.patch)}",
                                     fix="pick sizes that are multiples of the patch")
            if self.grid_of(hw) not in self.scales:
                raise TokenizerError(f"flexvq size {_shown(hw)} ends on a {_shown(self.grid_of(hw))} token grid, "
                                     f"which is not one of the scales {[_shown(s) for s in self.scales]}",
                                     fix=f"add {list(self.grid_of(hw))} to scales (a size's tokens are the scales "
                                         "up to its grid)")
        largest = self.grid_of(self.sizes[-1])
        if self.scales[-1] != largest:
            raise TokenizerError(f"flexvq's finest scale {_shown(self.scales[-1])} is not the largest size's grid "
                                 f"{_shown(largest)}", fix="end scales at the largest size / patch, or add the "
                                                           "size that scale draws to sizes")
        if input_shape is not None:
            self.check_size(tuple(int(n) for n in input_shape), "the samples it is fitted on")
        self.codebook_size = int(codebook_size)
        self.modality = modality
        self.seed, self.fit_vectors, self.fit_iters = int(seed), int(fit_vectors), int(fit_iters)
        self.dim = self.channels * self.patch[0] * self.patch[1]
        self.init_state(self.dim, device)

    # ------------------------------------------------------------ sizes and layout

    def grid_of(self, size: Sequence[int]) -> tuple[int, int]:
        return (int(size[0]) // self.patch[0], int(size[1]) // self.patch[1])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The largest sample shape it takes (what a caller that needs one shape, e.g. a control map, reads)."""
        return (self.channels, *self.sizes[-1])

    @property
    def boundaries(self) -> list[int]:
        """Token offset where each scale starts, plus the total of the finest size."""
        out = [0]
        for s in self.scales:
            out.append(out[-1] + s[0] * s[1])
        return out

    def length_of(self, size: Sequence[int]) -> int:
        """Tokens of an image of ``size`` (one of ``sizes``): the scales up to its grid."""
        return self.boundaries[self.scales.index(self.grid_of(size)) + 1]

    def size_of(self, length: int) -> tuple[int, int]:
        """The image size ``length`` tokens decode to: its last scale's grid times the patch."""
        bounds = self.boundaries
        if length not in bounds[1:]:
            raise TokenizerError(f"flexvq decodes whole scales: {length} tokens end inside one (scales end at "
                                 f"{bounds[1:]})", fix="pass token sequences produced by this tokenizer")
        s = self.scales[bounds.index(length) - 1]
        return (s[0] * self.patch[0], s[1] * self.patch[1])

    def check_size(self, shape: tuple[int, ...], whose: str = "a sample") -> None:
        """A sample of ``shape`` (C, H, W) is one this tokenizer takes, or one line says which sizes are."""
        if len(shape) != 3 or shape[0] != self.channels or tuple(shape[1:]) not in self.sizes:
            taken = ", ".join(_shown(s) for s in self.sizes)
            raise TokenizerError(f"flexvq takes {self.channels}-channel images of {taken}; {whose} is "
                                 f"{'x'.join(str(n) for n in shape)} (C x H x W)",
                                 fix="set the reader's size (and channels) to one of them, or add the size to the "
                                     "tokenizer's sizes and fit it again")

    @property
    def vocab_size(self) -> int:
        return self.codebook_size

    @property
    def tokens_per_sample(self) -> int | None:
        return self.boundaries[-1] if len(self.sizes) == 1 else None

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "sizes": [list(s) for s in self.sizes], "patch": list(self.patch),
                "scales": [list(s) for s in self.scales], "codebook_size": self.codebook_size,
                "modality": self.modality, "seed": self.seed, "fit_vectors": self.fit_vectors,
                "fit_iters": self.fit_iters}

    def layout(self) -> dict[str, Any]:
        """``sizes`` marks a layout whose samples are prefixes of ``scales`` (one length per size)."""
        return {"axes": ["scale", "y", "x"], "patch": list(self.patch), "scales": [list(s) for s in self.scales],
                "boundaries": self.boundaries, "sizes": [list(s) for s in self.sizes],
                "lengths": [self.length_of(s) for s in self.sizes],
                "order": "coarse to fine; row-major within a scale; a size's tokens end at its grid"}

    def positions(self, idx_L: torch.Tensor | None = None) -> torch.Tensor:
        rows = []
        for k, (h, w) in enumerate(self.scales):
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(torch.stack([torch.full((h * w,), k), yy.reshape(-1), xx.reshape(-1)], dim=1))
        out = torch.cat(rows)
        return out if idx_L is None else out[: int(idx_L.numel())]

    # ------------------------------------------------------------ pixels <-> patch vectors

    def _features(self, x_BCHW: torch.Tensor, scale: tuple[int, int]) -> torch.Tensor:
        """``f_BlD``: the images resized to ``scale`` x patch pixels, normalized and cut into patches."""
        size = (scale[0] * self.patch[0], scale[1] * self.patch[1])
        x_BCHW = x_BCHW.float().cpu()   # resized on the CPU: a GPU rounds its own way, and tokens must not differ
        if tuple(x_BCHW.shape[-2:]) != size:
            x_BCHW = F.interpolate(x_BCHW, size=size, mode="bilinear", antialias=True, align_corners=False)
        x_BCHW = x_BCHW.to(self.mean_C.device)
        view = (1, self.channels, 1, 1)
        return patchify((x_BCHW - self.mean_C.view(view)) / self.std_C.view(view), self.patch)

    def _pixels(self, f_BlD: torch.Tensor, scale: tuple[int, int]) -> torch.Tensor:
        view = (1, self.channels, 1, 1)
        return unpatchify(f_BlD, scale, self.patch, self.channels) * self.std_C.view(view) + self.mean_C.view(view)

    def _scales_of(self, size: Sequence[int]) -> list[tuple[int, int]]:
        return self.scales[: self.scales.index(self.grid_of(size)) + 1]

    # ------------------------------------------------------------ fit

    @torch.no_grad()
    def fit(self, samples: Sequence[np.ndarray] | torch.Tensor) -> FlexScaleVQ:
        """Channel statistics over every pixel, then k-means on the patch vectors of every scale of every
        sample (an image contributes the scales up to its own grid)."""
        arrays = [np.asarray(a, dtype=np.float32) for a in samples]
        if not arrays:
            raise TokenizerError("flexvq needs samples to fit on", fix="point the tokenizer stage at images")
        for i, a in enumerate(arrays):
            self.check_size(tuple(a.shape), f"fit sample {i}")
        pixels = np.concatenate([a.reshape(self.channels, -1) for a in arrays], axis=1)
        self.mean_C = torch.from_numpy(pixels.mean(1))
        self.std_C = torch.from_numpy(pixels.std(1, ddof=1)).clamp_min(1e-6)
        vectors = []   # on the CPU, with the CPU statistics; place() moves the result to the device
        groups = by_shape(arrays)
        for shape, idx in groups:
            x = torch.from_numpy(np.stack([arrays[i] for i in idx]))
            for s in self._scales_of(shape[1:]):
                vectors.append(self._features(x, s).reshape(-1, self.dim))
        v_ND = torch.cat(vectors)
        g = torch.Generator().manual_seed(self.seed)
        if v_ND.shape[0] > self.fit_vectors:
            v_ND = v_ND[torch.randperm(v_ND.shape[0], generator=g)[: self.fit_vectors]]
        self.codebook_KD = kmeans(v_ND, self.codebook_size, iters=self.fit_iters, seed=self.seed)
        self.code_sq_K = self.codebook_KD.pow(2).sum(1)
        self.place()
        self.fit_info = {"samples": len(arrays), "vectors": int(v_ND.shape[0]),
                         "sizes": sorted(_shown(shape[1:]) for shape, _ in groups)}
        return self

    # ------------------------------------------------------------ encode / decode

    @torch.no_grad()
    def encode(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """``x_BCHW`` (one size) -> ``idx_BL``: the token map of every scale up to its grid, coarse to fine."""
        self.check_size(tuple(x_BCHW.shape[1:]), "the batch")
        x = x_BCHW.float()
        tokens = []
        for s in self._scales_of(x.shape[-2:]):
            f_BlD = self._features(x, s)
            b, n, d = f_BlD.shape
            tokens.append(nearest_code(f_BlD.reshape(-1, d), self.codebook_KD, self.code_sq_K).view(b, n))
        return torch.cat(tokens, dim=1)

    @torch.no_grad()
    def decode(self, idx_BL: torch.Tensor) -> torch.Tensor:
        """``idx_BL`` (one length) -> ``x_BCHW``: the last scale's token map is the image."""
        length = int(idx_BL.shape[1])
        size = self.size_of(length)
        if idx_BL.numel() and (int(idx_BL.min()) < 0 or int(idx_BL.max()) >= self.codebook_size):
            raise TokenizerError(f"flexvq token ids must lie in [0, {self.codebook_size})",
                                 fix="pass token sequences produced by this tokenizer")
        scale = self.grid_of(size)
        last = idx_BL[:, length - scale[0] * scale[1]:].to(self.device).long()
        return self._pixels(self.codebook_KD[last], scale)

    def encode_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(arrays)
        for i, a in enumerate(arrays):
            self.check_size(tuple(np.shape(a)), f"sample {i} of the batch")
        with full_float32(self.device):
            for _shape, idx in by_shape(arrays):
                for s in range(0, len(idx), self.batch_size):
                    part = idx[s:s + self.batch_size]
                    x = torch.from_numpy(np.stack([np.asarray(arrays[i], dtype=np.float32) for i in part]))
                    for i, tokens in zip(part, self.encode(x).cpu().numpy()):
                        out[i] = tokens
        return out

    def decode_arrays(self, tokens: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(tokens)
        flat = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tokens]
        with full_float32(self.device):
            for _shape, idx in by_shape(flat):
                for s in range(0, len(idx), self.batch_size):
                    part = idx[s:s + self.batch_size]
                    idx_BL = torch.from_numpy(np.stack([flat[i] for i in part]))
                    for i, image in zip(part, self.decode(idx_BL.to(self.device)).cpu().numpy()):
                        out[i] = image
        return out

    # ------------------------------------------------------------ the model's next-scale input

    @torch.no_grad()
    def next_scale_input_mix(self) -> torch.Tensor:
        """``mix_NN`` over the finest size's tokens: scale ``k``'s rows read scale ``k - 1``'s code vectors,
        interpolated bilinearly onto scale ``k``'s cells (FlexVAR's input; no accumulation, as there is no
        residual). Scale 0's rows are zero (its input is the start token). A smaller size's mix is the
        leading block: no scale reads a finer one."""
        bounds = self.boundaries
        mix_NN = torch.zeros(bounds[-1], bounds[-1])
        for k in range(1, len(self.scales)):
            (ph, pw), (h, w) = self.scales[k - 1], self.scales[k]
            up = torch.kron(_interp_matrix(ph, h), _interp_matrix(pw, w))
            mix_NN[bounds[k]:bounds[k + 1], bounds[k - 1]:bounds[k]] = up
        return mix_NN



def length_of_size(layout: dict[str, Any], size: Sequence[int]) -> int | None:
    """Tokens of a ``size`` image under a flexvq ``layout()``, or None when the layout does not take that size."""
    sizes = [tuple(s) for s in layout.get("sizes") or []]
    hw = _pair(size)
    return int(layout["lengths"][sizes.index(hw)]) if hw in sizes else None


__all__ = ["FlexScaleVQ", "length_of_size"]
