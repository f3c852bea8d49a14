"""vqvae: a small learned convolutional VQ-VAE (2-D for images, 3-D for volumes and video).

Where patch_vq quantizes raw patches, a VQ-VAE learns what to quantize and a
decoder that blends neighbouring codes, so it reconstructs better at the same
token count. Training uses the straight-through estimator (decoder gradients
pass the quantizer unchanged) and a commitment loss (``beta``) that keeps the
encoder near its codes. The codebook itself follows the encoder outputs by
exponential moving averages (online k-means, ``ema_decay``) rather than by
gradient steps, which keeps up with a fast-changing encoder in short CPU runs.
Code usage is tracked as a moving average: codes whose usage falls below
``dead_threshold`` of uniform are restarted on encoder outputs of the current
batch, which keeps the whole codebook in use.

Trains on CPU here and on a GPU when one is present: ``device="auto"`` picks
CUDA when available. Inside an initialized ``torch.distributed`` group of more
than one process (gloo on CPU, NCCL on GPU; ``modalities.vqvae_fit`` starts one
with Ray Train) :meth:`VQVAE.fit` trains data-parallel: each rank draws its part
of the global batch from its own shard of the samples, gradients and codebook
statistics are summed over ranks, and rank 0 picks dead-code replacements, so
every rank keeps identical weights and codebook.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import (
    FixedLengthTokenizer,
    TokenizerError,
    as_batch,
    check_input_shape,
    check_tokens,
    resolve_device,
)
from .codebook import kmeans_pp_init, nearest_code
from .patches import axes_for, from_grid, grid_of, grid_positions, to_grid


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) when training alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_batch_size(batch_size: int, rank: int, world_size: int) -> int:
    """This rank's part of the global batch: the remainder goes to the first ranks."""
    return batch_size // world_size + (rank < batch_size % world_size)


def check_data_parallel(samples: int, batch_size: int, world_size: int) -> None:
    """Every rank needs at least one sample of its own and one row of every global batch."""
    if samples < world_size:
        raise TokenizerError(f"vqvae fit on {world_size} workers needs at least {world_size} samples, got {samples}",
                             fix="fit on more samples or use fewer workers")
    if batch_size < world_size:
        raise TokenizerError(f"vqvae fit batch_size {batch_size} is smaller than the {world_size} workers that "
                             "split it", fix="raise fit.batch_size or lower workers")


def lr_factor(progress: float, warmup: float = 0.05, floor: float = 0.02) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to ``floor``."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


class _ResBlock(nn.Module):
    def __init__(self, conv: type[nn.Module], ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.GELU(), conv(ch, ch, 3, padding=1), nn.GELU(), conv(ch, ch, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


def _stage_strides(downsample: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-stage strides (2 or 1 per axis) that multiply up to ``downsample``."""
    stages = max(int(math.log2(d)) for d in downsample)
    return [tuple(2 if d >> (i + 1) else 1 for d in downsample) for i in range(stages)]


class _Net(nn.Module):
    """Encoder, codebook and decoder; ``nd`` = 2 or 3 spatial axes."""

    def __init__(self, channels: int, nd: int, downsample: tuple[int, ...], hidden: int, code_dim: int,
                 codebook_size: int):
        super().__init__()
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        deconv = nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d
        enc: list[nn.Module] = [conv(channels, hidden, 3, padding=1)]
        dec: list[nn.Module] = []
        for stride in _stage_strides(downsample):
            kernel = tuple(4 if s == 2 else 3 for s in stride)
            enc += [nn.GELU(), conv(hidden, hidden, kernel, stride=stride, padding=1)]
            dec += [nn.GELU(), deconv(hidden, hidden, kernel, stride=stride, padding=1)]
        enc += [_ResBlock(conv, hidden), nn.GELU(), conv(hidden, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(conv(code_dim, hidden, 3, padding=1), _ResBlock(conv, hidden), *dec,
                                     nn.GELU(), conv(hidden, channels, 3, padding=1))
        # the codebook follows the encoder by exponential moving averages (k-means online), not by the
        # optimizer: codes keep up with a fast-changing encoder, which short CPU runs need
        self.register_buffer("codebook_KD", torch.randn(codebook_size, code_dim) * 0.1)
        self.register_buffer("ema_count_K", torch.ones(codebook_size))
        self.register_buffer("ema_sum_KD", self.codebook_KD.clone())
        self.register_buffer("usage_K", torch.full((codebook_size,), 1.0 / codebook_size))


class VQVAE(FixedLengthTokenizer):
    """Conv VQ-VAE tokenizer: one token per ``downsample`` cell of the input grid.

    ``input_shape`` is ``(C, H, W)`` or ``(C, D|T, H, W)``; ``downsample`` is an
    int (every axis) or one power of two per axis, e.g. ``(1, 4, 4)`` for
    per-frame video tokens.
    """

    type = "vqvae"
    #: where it runs is not what it is: the device stays out of config() and so out of the digest
    runtime_options = ("device",)

    def __init__(self, *, input_shape: Sequence[int], downsample: int | Sequence[int] = 4, codebook_size: int = 512,
                 hidden: int = 64, code_dim: int = 16, beta: float = 0.25, dead_threshold: float = 0.03,
                 ema_decay: float = 0.9, usage_decay: float = 0.99, modality: str = "image", device: str = "auto", seed: int = 0):
        self.input_shape = tuple(int(s) for s in input_shape)
        self.channels, nd = self.input_shape[0], len(self.input_shape) - 1
        if nd not in (2, 3):
            raise TokenizerError(f"vqvae input_shape {self.input_shape} must be (C, H, W) or (C, D, H, W)",
                                 fix="give channels first, then 2 or 3 spatial sides")
        ds = (int(downsample),) * nd if isinstance(downsample, int) else tuple(int(d) for d in downsample)
        if len(ds) != nd or any(d < 1 or d & (d - 1) for d in ds):
            raise TokenizerError(f"vqvae downsample {ds} must be powers of two, one per spatial axis",
                                 fix="use e.g. 4 or (1, 4, 4)")
        self.downsample = ds
        self.grid = grid_of(self.input_shape[1:], ds, self.type)
        self.modality = modality
        self.axes = axes_for(modality, nd)
        self.codebook_size, self.hidden, self.code_dim = int(codebook_size), int(hidden), int(code_dim)
        self.beta, self.dead_threshold = float(beta), float(dead_threshold)
        self.ema_decay, self.usage_decay = float(ema_decay), float(usage_decay)
        self.device_name, self.seed = device, int(seed)
        self.device = resolve_device(device)
        torch.manual_seed(self.seed)
        self.net = _Net(self.channels, nd, ds, self.hidden, self.code_dim, self.codebook_size).to(self.device)
        self.mean_C = torch.zeros(self.channels)
        self.std_C = torch.ones(self.channels)
        self.fit_info: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}

    # ------------------------------------------------------------ properties

    @property
    def tokens_per_sample(self) -> int:
        return math.prod(self.grid)

    def config(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "downsample": list(self.downsample),
                "codebook_size": self.codebook_size, "hidden": self.hidden, "code_dim": self.code_dim,
                "beta": self.beta, "dead_threshold": self.dead_threshold, "ema_decay": self.ema_decay,
                "usage_decay": self.usage_decay,
                "modality": self.modality, "seed": self.seed}

    def layout(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "grid": list(self.grid), "downsample": list(self.downsample),
                "order": "row-major over the grid"}

    def positions(self, idx_L: torch.Tensor | None = None) -> torch.Tensor:
        return grid_positions(self.grid)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        return {**state, "mean": self.mean_C, "std": self.std_C}

    def code_embeddings(self) -> torch.Tensor:
        """The EMA codebook in the encoder's latent space (``code_dim``), the decoder's input."""
        return self.net.codebook_KD

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.mean_C, self.std_C = tensors["mean"].float(), tensors["std"].float()

    # ------------------------------------------------------------ internals

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        view = [1, self.channels] + [1] * len(self.grid)
        return (x.float().to(self.device) - self.mean_C.to(self.device).view(view)) / self.std_C.to(self.device).view(view)

    def _denormalize(self, x: torch.Tensor) -> torch.Tensor:
        view = [1, self.channels] + [1] * len(self.grid)
        return x * self.std_C.to(self.device).view(view) + self.mean_C.to(self.device).view(view)

    def _quantize(self, e_BDS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(``idx_BL``, ``q_BDS`` with straight-through gradients, commitment loss)."""
        b, d = e_BDS.shape[:2]
        z_ND = from_grid(e_BDS).reshape(-1, d)
        codebook_KD = self.net.codebook_KD
        idx_N = nearest_code(z_ND.detach(), codebook_KD)
        q_ND = codebook_KD[idx_N]
        commitment = F.mse_loss(z_ND, q_ND)
        q_ND = z_ND + (q_ND - z_ND).detach()
        q_BDS = to_grid(q_ND.view(b, -1, d), e_BDS.shape[2:])
        return idx_N.view(b, -1), q_BDS, commitment

    @torch.no_grad()
    def _update_codebook(self, idx_BL: torch.Tensor, z_ND: torch.Tensor, g: torch.Generator,
                         world_size: int = 1) -> int:
        """EMA codebook step and usage tracking; restarts codes whose usage fell below
        ``dead_threshold`` of uniform on random encoder outputs of this batch. Returns restarts.

        With ``world_size`` > 1 the code hits and sums are summed over ranks, and rank 0's
        replacements are broadcast, so that every rank ends the step with the same codebook."""
        net, k, decay = self.net, self.codebook_size, self.ema_decay
        idx_N = idx_BL.reshape(-1)
        hits_K = torch.bincount(idx_N, minlength=k).float()
        sums_KD = torch.zeros_like(net.ema_sum_KD).index_add_(0, idx_N, z_ND)
        if world_size > 1:
            stats = torch.cat([hits_K[:, None], sums_KD], 1)
            dist.all_reduce(stats)
            hits_K, sums_KD = stats[:, 0], stats[:, 1:]
        net.ema_count_K.mul_(decay).add_(hits_K, alpha=1 - decay)
        net.ema_sum_KD.mul_(decay).add_(sums_KD, alpha=1 - decay)
        n = net.ema_count_K.sum()
        count_K = (net.ema_count_K + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing: no division by zero
        net.codebook_KD.copy_(net.ema_sum_KD / count_K[:, None])
        net.usage_K.mul_(self.usage_decay).add_(hits_K / hits_K.sum(), alpha=1 - self.usage_decay)
        # usage_K is the same on every rank, so every rank finds the same dead codes
        dead = (net.usage_K < self.dead_threshold / k).nonzero().flatten()
        if dead.numel():
            if world_size > 1:
                fresh_RD = torch.empty(dead.numel(), z_ND.shape[1], dtype=z_ND.dtype, device=z_ND.device)
                if dist.get_rank() == 0:
                    fresh_RD.copy_(z_ND[torch.randint(z_ND.shape[0], (dead.numel(),), generator=g).to(z_ND.device)])
                dist.broadcast(fresh_RD, src=0)
            else:
                fresh_RD = z_ND[torch.randint(z_ND.shape[0], (dead.numel(),), generator=g).to(z_ND.device)]
            net.codebook_KD[dead] = fresh_RD
            net.ema_sum_KD[dead] = fresh_RD
            net.ema_count_K[dead] = 1.0
            net.usage_K[dead] = 1.0 / k
        return int(dead.numel())

    # --------------------------------------------------------------- training

    def fit(self, samples: Sequence[np.ndarray] | torch.Tensor, *, steps: int = 2000, batch_size: int = 64,
            lr: float = 2e-3, log_every: int = 50, time_limit_s: float | None = None) -> VQVAE:
        """Train on ``samples`` for ``steps`` (or until ``time_limit_s``); records the loss curve in fit_info.

        In a process group of several ranks every rank passes all samples and trains on its shard
        ``samples[rank::world_size]``; ``batch_size`` stays the global batch, split over the ranks,
        so the same options give the same optimization at any worker count."""
        rank, world_size = world()
        if world_size > 1:
            check_data_parallel(len(samples), batch_size, world_size)
            samples = samples[rank::world_size]
        x = as_batch(samples)
        check_input_shape(x, self.input_shape, self.type)
        dims = [0] + list(range(2, x.dim()))
        if world_size > 1:
            self.mean_C, self.std_C = self._global_moments(x, dims)
        else:
            self.mean_C, self.std_C = x.mean(dims), x.std(dims).clamp_min(1e-6)
        data = self._normalize(x)
        g = torch.Generator().manual_seed(self.seed + rank)
        net = self.net.train()
        with torch.no_grad():  # codes start on encoder outputs, not noise, so few die at the first step
            if rank == 0:
                first = data[torch.randperm(data.shape[0], generator=g)[:batch_size]]
                e_ND = from_grid(net.encoder(first)).reshape(-1, self.code_dim).cpu()
                net.codebook_KD.copy_(kmeans_pp_init(e_ND, self.codebook_size, g).to(self.device))
                net.ema_sum_KD.copy_(net.codebook_KD)
                net.ema_count_K.fill_(1.0)
            if world_size > 1:  # every rank starts from rank 0's weights and codebook
                for tensor in [*net.parameters(), *net.buffers()]:
                    dist.broadcast(tensor, src=0)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        rank_batch = rank_batch_size(batch_size, rank, world_size)
        curve, restarts, start = [], 0, time.perf_counter()
        step, progress = 0, 0.0
        while progress < 1.0:
            step += 1
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(progress)
            batch = data[torch.randint(data.shape[0], (rank_batch,), generator=g).to(self.device)]
            e_BDS = net.encoder(batch)
            idx_BL, q_BDS, commitment = self._quantize(e_BDS)
            recon = F.mse_loss(net.decoder(q_BDS), batch)
            loss = recon + self.beta * commitment
            opt.zero_grad(set_to_none=True)
            if world_size > 1:
                # each rank's mean weighted by its share of the global batch: summed over ranks,
                # the gradients are those of the global batch's mean loss
                (loss * (rank_batch / batch_size)).backward()
                self._sum_gradients()
            else:
                loss.backward()
            opt.step()
            restarts += self._update_codebook(idx_BL, from_grid(e_BDS.detach()).reshape(-1, self.code_dim), g,
                                              world_size)
            # progress runs on steps, or on the clock when that ends first, so a time-limited run
            # still warms up, peaks and anneals instead of stopping early in its warm-up
            progress = step / steps
            if time_limit_s is not None:
                progress = max(progress, (time.perf_counter() - start) / time_limit_s)
                if world_size > 1:  # clocks differ: the furthest-along reading decides for all ranks
                    progress = self._max_over_ranks(progress)
            if step % log_every == 0 or progress >= 1.0:
                losses = torch.stack([recon.detach(), commitment.detach()])
                if world_size > 1:
                    losses *= rank_batch / batch_size
                    dist.all_reduce(losses)
                curve.append({"step": step, "recon": round(float(losses[0]), 6),
                              "commitment": round(float(losses[1]), 6)})
        net.eval()
        self.fit_info = {"steps": step, "batch_size": batch_size, "lr": lr, "dead_code_restarts": restarts,
                         "curve": curve}
        self.provenance = {"device": str(self.device), "seconds": round(time.perf_counter() - start, 2),
                           "workers": world_size}
        return self

    def _global_moments(self, x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over the samples of all ranks (each rank holds its shard ``x``)."""
        x64 = x.double()
        count_C = torch.full((self.channels,), x64.numel() / self.channels, dtype=torch.float64)
        stats_3C = torch.stack([count_C, x64.sum(dims), x64.pow(2).sum(dims)]).to(self.device)
        dist.all_reduce(stats_3C)
        n_C, sum_C, sq_C = stats_3C.cpu()
        mean_C = sum_C / n_C
        var_C = (sq_C - n_C * mean_C.pow(2)).clamp_min(0) / (n_C - 1).clamp_min(1)
        return mean_C.float(), var_C.sqrt().float().clamp_min(1e-6)

    def _sum_gradients(self) -> None:
        """All-reduce (sum) the gradients of every parameter in one flat buffer."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def _max_over_ranks(self, value: float) -> float:
        reading = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(reading, op=dist.ReduceOp.MAX)
        return float(reading)

    # ------------------------------------------------------ encode / decode

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x_BC<spatial>`` -> ``idx_BL``."""
        check_input_shape(x, self.input_shape, self.type)
        e_BDS = self.net.encoder(self._normalize(x))
        return self._quantize(e_BDS)[0].cpu()

    @torch.no_grad()
    def decode(self, idx_BL: torch.Tensor) -> torch.Tensor:
        """``idx_BL`` -> ``x_BC<spatial>``."""
        check_tokens(idx_BL, self.tokens_per_sample, self.codebook_size, self.type)
        q_BLD = self.net.codebook_KD[idx_BL.long().to(self.device)]
        return self._denormalize(self.net.decoder(to_grid(q_BLD, self.grid))).cpu()
