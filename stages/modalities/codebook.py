"""Codebooks: nearest-code search and mini-batch k-means, shared by the VQ tokenizers.

The nearest-code search is the hot loop of patch_vq and msvq encoding. It
drops the per-row ``|x|^2`` term (constant for the argmin) and fuses
``|c|^2 - 2 x.c`` into one ``addmm``, so it does less work than
``torch.cdist(...).argmin`` (no square root, no row norms); it is chunked so
that the distance matrix never exceeds a fixed byte budget.
"""

from __future__ import annotations

import torch

from .base import resolve_device

#: distance-matrix budget per chunk, in float32 elements (64 MiB)
CHUNK_ELEMENTS = 16 * 1024 * 1024


def nearest_code(z_ND: torch.Tensor, codebook_KD: torch.Tensor,
                 code_sq_K: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the closest code (squared L2) for every row: ``idx_N``."""
    if code_sq_K is None:
        code_sq_K = codebook_KD.pow(2).sum(1)
    n, k = z_ND.shape[0], codebook_KD.shape[0]
    codebook_DK = codebook_KD.t()
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    if n <= rows:
        return torch.addmm(code_sq_K, z_ND, codebook_DK, alpha=-2.0).argmin(1)
    idx_N = torch.empty(n, dtype=torch.long, device=z_ND.device)
    for s in range(0, n, rows):
        idx_N[s:s + rows] = torch.addmm(code_sq_K, z_ND[s:s + rows], codebook_DK, alpha=-2.0).argmin(1)
    return idx_N


def kmeans_pp_init(x_ND: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: spread initial codes over the data (better optima than random picks)."""
    n = x_ND.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x_ND[first]]
    d2_N = (x_ND - x_ND[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2_N.sum())
        if total <= 0:  # fewer distinct points than codes: duplicates fill the rest
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(d2_N / total, 1, generator=generator))
        centers.append(x_ND[pick])
        d2_N = torch.minimum(d2_N, (x_ND - x_ND[pick]).pow(2).sum(1))
    return torch.stack(centers)


def kmeans(x_ND: torch.Tensor, k: int, *, iters: int = 50, batch_size: int = 4096, seed: int = 0,
           init_KD: torch.Tensor | None = None, refine: int = 2) -> torch.Tensor:
    """Mini-batch k-means (Sculley 2010) on the rows of ``x_ND``; returns ``codebook_KD``.

    Per-code learning rates 1/count make later batches move codes less, so the
    result converges without holding more than one batch of distances. Codes
    that never win are re-seeded on random points, then ``refine`` full Lloyd
    passes polish the result (cheap at the sample sizes used for fitting).
    """
    x_ND = x_ND.float()
    g = torch.Generator().manual_seed(seed)
    n = x_ND.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    if init_KD is None:
        seed_rows = torch.randperm(n, generator=g)[: min(n, max(20 * k, 2048))]
        codebook_KD = kmeans_pp_init(x_ND[seed_rows], k, g).clone()
    else:
        codebook_KD = init_KD.float().clone()
    counts_K = torch.zeros(k)
    for _ in range(iters):
        batch_BD = x_ND[torch.randint(n, (min(batch_size, n),), generator=g)]
        idx_B = nearest_code(batch_BD, codebook_KD)
        hits_K = torch.bincount(idx_B, minlength=k).float()
        sums_KD = torch.zeros_like(codebook_KD).index_add_(0, idx_B, batch_BD)
        counts_K += hits_K
        won = hits_K > 0
        rate_K = hits_K[won] / counts_K[won]
        codebook_KD[won] += rate_K[:, None] * (sums_KD[won] / hits_K[won, None] - codebook_KD[won])
    for _ in range(refine + 1):
        idx_N = nearest_code(x_ND, codebook_KD)
        hits_K = torch.bincount(idx_N, minlength=k).float()
        dead = hits_K == 0
        if dead.any():
            codebook_KD[dead] = x_ND[torch.randint(n, (int(dead.sum()),), generator=g)]
            continue
        sums_KD = torch.zeros_like(codebook_KD).index_add_(0, idx_N, x_ND)
        codebook_KD = sums_KD / hits_K[:, None]
    return codebook_KD


class CodebookState:
    """The learned state of a k-means VQ (patch_vq, msvq): codebook plus per-channel statistics, kept on
    ``device`` (where the tokenizer encodes; a fit runs on the CPU and ends with :meth:`place`)."""

    codebook_size: int
    channels: int
    codebook_KD: torch.Tensor
    code_sq_K: torch.Tensor
    mean_C: torch.Tensor
    std_C: torch.Tensor
    device: torch.device

    def init_state(self, dim: int, device: str) -> None:
        """An unfitted state: ``codebook_size`` zero codes of ``dim`` values, identity channel statistics
        (``channels`` of them), on ``device`` (``cpu``, ``cuda`` or ``auto``)."""
        self.codebook_KD = torch.zeros(self.codebook_size, dim)
        self.code_sq_K = torch.zeros(self.codebook_size)
        self.mean_C = torch.zeros(self.channels)
        self.std_C = torch.ones(self.channels)
        self.device = resolve_device(device)
        self.place()
        self.fit_info = {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"codebook": self.codebook_KD, "mean": self.mean_C, "std": self.std_C}

    def code_embeddings(self) -> torch.Tensor:
        """The k-means centroids in normalized patch (or residual) space: close codes decode alike."""
        return self.codebook_KD

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.codebook_KD = tensors["codebook"].float()
        self.code_sq_K = self.codebook_KD.pow(2).sum(1)   # cached |c|^2 for nearest_code
        self.mean_C, self.std_C = tensors["mean"].float(), tensors["std"].float()
        self.place()

    def place(self) -> None:
        """Move the state to ``device``. ``|c|^2`` is summed on the CPU first, so a GPU compares the very
        numbers the CPU does (a GPU's reduction order would round them differently)."""
        self.codebook_KD, self.code_sq_K, self.mean_C, self.std_C = (
            t.to(self.device) for t in (self.codebook_KD, self.code_sq_K, self.mean_C, self.std_C))
