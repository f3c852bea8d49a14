"""levels: one token per pixel of a single-channel sample, its value in [0, 1] quantized to ``levels`` bins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from arpipe.stages.modalities.base import (
    FixedLengthTokenizer,
    TokenizerError,
    check_input_shape,
    check_tokens,
)
from arpipe.stages.modalities.patches import grid_positions


class LevelTokenizer(FixedLengthTokenizer):
    type = "levels"
    learned = False       # fit() has nothing to learn

    def __init__(self, *, input_shape: Sequence[int], levels: int = 16, modality: str = "image"):
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 3 or self.input_shape[0] != 1:
            raise TokenizerError(f"levels takes (1, H, W) samples, got {self.input_shape}",
                                 fix="read the source with channels: 1")
        self.codebook_size = int(levels)  # FixedLengthTokenizer's vocab_size
        self.modality = modality
        self.fit_info: dict[str, Any] = {}

    @property
    def tokens_per_sample(self) -> int:
        return math.prod(self.input_shape)

    def config(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "levels": self.codebook_size, "modality": self.modality}

    def layout(self) -> dict[str, Any]:
        return {"axes": ["y", "x"], "grid": list(self.input_shape[1:]), "order": "row-major over the grid"}

    def positions(self, idx_L: torch.Tensor | None = None) -> torch.Tensor:
        return grid_positions(self.input_shape[1:])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"levels": torch.tensor([self.codebook_size])}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    @torch.no_grad()
    def encode(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        check_input_shape(x_B1HW, self.input_shape, self.type)
        idx_B1HW = (x_B1HW.float().clamp(0, 1) * (self.codebook_size - 1)).round().long()
        return idx_B1HW.flatten(1)

    @torch.no_grad()
    def decode(self, idx_BL: torch.Tensor) -> torch.Tensor:
        check_tokens(idx_BL, self.tokens_per_sample, self.codebook_size, self.type)
        return (idx_BL.float() / (self.codebook_size - 1)).view(-1, *self.input_shape)
