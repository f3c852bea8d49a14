"""The EMA of the weights (``ema: {decay, every}``): kept by every rank on its share, checkpointed, merged at the end.

After every ``every``-th optimizer step ``ema = decay * ema + (1 - decay) * weights``, starting from the
initial weights: the convention of torch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` and of timm's
``ModelEmaV2`` (the same ``lerp``). What is averaged is the fp32 *master* weights, the values the optimizer
steps, in every precision; and each rank averages only its own share of them (``weights.master_shares``), so
the EMA is divided over the ranks the way the optimizer's fp32 copy is:

- ZeRO-3: the rank's partition of each parameter (``param.ds_tensor`` in fp32, the optimizer's fp32
  partition under bf16/fp16), without the padding of the last partition;
- ZeRO-1/2: each parameter's fragment in the rank's fp32 optimizer partition (under bf16/fp16 too);
- ZeRO-0: whole parameters on every rank (the module's own in fp32, the fp16 optimizer's fp32 copies under
  bf16/fp16).

A :class:`Share` is a flat fp32 tensor and where it starts in its flattened parameter. Every checkpoint holds
each rank's shares (``ema-rank<r>.safetensors``, written before the rank's marker, which so covers it); a
resume reads the rank's own file back, bitwise, or, should the ranks now divide the parameters differently,
every rank's, merged. At the end the train stage merges the final checkpoint's files (:func:`merge`) into the
model folder's ``ema.safetensors``: no collective is needed. Parameters the optimizer does not hold (frozen
ones) have no EMA; the model folder gives them their raw values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FILE = "ema-rank{rank}.safetensors"
PATTERN = "ema-rank*.safetensors"
FORMAT = "1"


@dataclass(frozen=True)
class Share:
    """A rank's part of one parameter: ``values`` (flat fp32) are elements ``start ...`` of the flattened
    parameter, which has ``numel`` elements in all."""

    name: str
    start: int
    numel: int
    values: torch.Tensor


def whole_shares(named) -> list[Share]:
    """Every parameter whole: the shares of ``named`` (name, tensor) pairs on a single process or under ZeRO-0."""
    return [Share(name, 0, p.numel(), p.detach().reshape(-1)) for name, p in named]


class Ema:
    """The EMA of this rank's shares; :meth:`update` after an optimizer step, when ``step % every == 0``."""

    def __init__(self, shares: list[Share], *, decay: float, every: int = 1):
        self.decay, self.every = decay, every
        self.shares = [Share(s.name, s.start, s.numel, s.values.detach().float().clone()) for s in shares]

    def layout(self) -> dict[str, list[int]]:
        """name -> [start, length, numel] of each share."""
        return {s.name: [s.start, s.values.numel(), s.numel] for s in self.shares}

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def update(self, shares: list[Share]) -> None:
        """One EMA step towards ``shares`` (the current weights, laid out as at the start)."""
        weight = 1.0 - self.decay
        for mine, now in zip(self.shares, shares, strict=True):
            if mine.name != now.name or mine.start != now.start:
                raise RuntimeError(f"EMA share {mine.name}@{mine.start} is updated from {now.name}@{now.start}")
            mine.values.lerp_(now.values, weight)

    def state(self) -> dict[str, torch.Tensor]:
        """The shares by parameter name (flat fp32, on the CPU)."""
        return {s.name: s.values.detach().cpu().contiguous() for s in self.shares}

    def save(self, folder: Path, rank: int) -> Path:
        """Write this rank's shares to ``folder`` (a checkpoint folder), as ``ema-rank<rank>.safetensors``."""
        from safetensors.torch import save_file

        path = Path(folder) / FILE.format(rank=rank)
        save_file(self.state(), str(path), metadata={"format": FORMAT, "decay": repr(self.decay),
                                                     "every": str(self.every), "layout": json.dumps(self.layout())})
        return path

    def load(self, folder: Path, rank: int) -> None:
        """Read this rank's shares back from a checkpoint ``folder`` written by :meth:`save` on every rank."""
        from safetensors import safe_open

        own = Path(folder) / FILE.format(rank=rank)
        values: dict[str, torch.Tensor]
        if own.exists() and _layout(own) == self.layout():
            with safe_open(str(own), "pt") as f:
                values = {s.name: f.get_tensor(s.name) for s in self.shares}
        else:   # laid out differently when written (another number of ranks): cut this rank's shares out
            whole = merge(sorted(Path(folder).glob(PATTERN)))
            values = {s.name: whole[s.name][s.start:s.start + s.values.numel()] for s in self.shares}
        for s in self.shares:
            s.values.copy_(values[s.name])


def _layout(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("layout", "{}"))


def merge(files: list[Path]) -> dict[str, torch.Tensor]:
    """Whole flat fp32 parameters by name from every rank's ``ema-rank<r>.safetensors``; an element no file
    holds (a rank's file missing) is an error."""
    import torch
    from safetensors import safe_open

    if not files:
        raise FileNotFoundError("the checkpoint holds no EMA (ema-rank<r>.safetensors)")
    whole: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name, (start, length, numel) in json.loads(f.metadata()["layout"]).items():
                if name not in whole:
                    whole[name] = torch.empty(numel, dtype=torch.float32)
                    covered[name] = torch.zeros(numel, dtype=torch.bool)
                whole[name][start:start + length] = f.get_tensor(name)
                covered[name][start:start + length] = True
    gaps = [name for name, done in covered.items() if not bool(done.all())]
    if gaps:
        raise ValueError(f"the EMA files {', '.join(p.name for p in files)} do not cover all of {gaps[0]}: "
                         "a rank's file is missing")
    return whole
