"""LANTERN's relaxed acceptance (Jang et al., ICLR 2025) for speculative decoding of visual tokens.

Visual AR models spread their probability over codes that decode to nearly
the same patch ("token selection ambiguity"), so a draft is often rejected
although a code next to it in the tokenizer's latent space was likely. LANTERN
credits a draft ``x`` with the target mass of its *latent proximity set*::

    B_k(x)      = x and its k - 1 nearest codes (codebook embeddings, L2), nearest first
    A_k,d(x)    = x and the longest prefix of B_k(x) \\ {x} whose total target mass stays <= d
    p~(x)       = p(A_k,d(x)) = p(x) + that mass    (0 where p(x) = 0: top-k/top-p cuts stay cut)
    accept x  with probability  min(1, p~(x) / q(x))

``d`` (``delta``) is therefore a probability budget, not a distance: moving the
mass of ``A(x) \\ {x}`` onto ``x`` changes ``p`` by at most ``d`` in total
variation (the paper's constraint). ``k`` counts ``x`` itself, so ``k = 1`` is
plain speculative acceptance; the authors' code (``--lantern_k``) counts
neighbours without ``x``, i.e. their ``lantern_k`` is our ``k - 1``.

On a rejection the caller keeps speculative sampling's residual
``norm(max(0, p - q))``. The token a verified position emits then has the
law ``P(y) = min(q(y), p~(y)) + (1 - sum_x min(q(x), p~(x))) * residual(y)``,
whose distance to ``p`` is at most the acceptance probability the relaxation
added: ``TV(P, p) <= sum_y [min(q(y), p~(y)) - min(q(y), p(y))]`` (this
module's :meth:`Relaxation.added_acceptance`); over a sample the distances of
its positions add up. Each term is at most ``min(q(y), d)``, so the budget
``d`` bounds the distortion per drafted code, not per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: distance-matrix budget per chunk while ranking neighbours, in float64 elements (64 MiB)
CHUNK_ELEMENTS = 8 * 1024 * 1024


def code_neighbours(codebook_KD: torch.Tensor, k: int) -> torch.Tensor:
    """``near_Kk``: each code's ``k`` nearest codes (squared L2), itself first, then by distance.

    Computed on the CPU in float64 with a stable sort (equal distances, as duplicate codes have, keep
    the lower index first), so every actor of a sample stage builds the same table.
    """
    K = codebook_KD.shape[0]
    if not 1 <= k <= K:
        raise ValueError(f"k must lie in [1, {K}] (the codebook's size), got {k}")
    c_KD = codebook_KD.detach().to("cpu", torch.float64)
    sq_K = c_KD.pow(2).sum(1)
    rows = max(1, CHUNK_ELEMENTS // K)
    near_Kk = torch.empty(K, k, dtype=torch.long)
    for s in range(0, K, rows):
        d_RK = torch.addmm(sq_K, c_KD[s:s + rows], c_KD.t(), alpha=-2.0) + sq_K[s:s + rows, None]
        own_R = torch.arange(s, min(s + rows, K))
        d_RK[own_R - s, own_R] = -1.0   # the code itself first, even next to a duplicate
        near_Kk[s:s + rows] = torch.sort(d_RK, dim=1, stable=True).indices[:, :k]
    return near_Kk


@dataclass(frozen=True)
class Relaxation:
    """Latent neighbourhoods over the model's whole vocabulary and the mass budget ``delta``.

    ``neighbours_VK[v]`` holds global ids, nearest first, ``v`` itself in column 0; rows of ids that are
    not codes of the sampled modality (specials, tags, classes, other modalities, text) are ``v`` alone,
    their other columns padding (``valid_VK`` False), so such ids are never credited any mass.
    """

    neighbours_VK: torch.Tensor   # (V, k) long
    valid_VK: torch.Tensor        # (V, k) bool
    delta: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"delta is a probability budget in [0, 1], got {self.delta}")
        if self.neighbours_VK.shape != self.valid_VK.shape or self.neighbours_VK.dim() != 2:
            raise ValueError(f"neighbours {tuple(self.neighbours_VK.shape)} and valid "
                             f"{tuple(self.valid_VK.shape)} must be the same (V, k) shape")

    @classmethod
    def from_codebook(cls, codebook_KD: torch.Tensor, *, k: int, delta: float, start: int,
                      vocab_size: int) -> Relaxation:
        """Neighbourhoods of the codes ``start .. start + K`` of a ``vocab_size`` vocabulary (global ids)."""
        K = codebook_KD.shape[0]
        if start < 0 or start + K > vocab_size:
            raise ValueError(f"codes [{start}, {start + K}) do not fit a vocabulary of {vocab_size}")
        neighbours_VK = torch.arange(vocab_size)[:, None].repeat(1, k)
        valid_VK = torch.zeros(vocab_size, k, dtype=torch.bool)
        valid_VK[:, 0] = True
        neighbours_VK[start:start + K] = code_neighbours(codebook_KD, k) + start
        valid_VK[start:start + K] = True
        return cls(neighbours_VK, valid_VK, float(delta))

    @property
    def k(self) -> int:
        return int(self.neighbours_VK.shape[1])

    def to(self, device: torch.device | str) -> Relaxation:
        return Relaxation(self.neighbours_VK.to(device), self.valid_VK.to(device), self.delta)

    def _credit(self, p_near_Qk: torch.Tensor) -> torch.Tensor:
        """Mass the nearest neighbours bring while their running total stays within ``delta``."""
        total_Qk = p_near_Qk.cumsum(-1)   # non-decreasing: the rows within the budget are a prefix
        return torch.where(total_Qk <= self.delta, total_Qk, torch.zeros_like(total_Qk)).amax(-1)

    def credited_mass(self, p_BWV: torch.Tensor, x_BW: torch.Tensor) -> torch.Tensor:
        """``p~(x)``: each draft's probability plus what its latent neighbourhood lends it; ``p(x)`` when k = 1.

        A draft ``p`` gives no probability (cut by top-k or top-p, or greedy's losers) gets no credit: the
        relaxation widens acceptance inside the sampler's support, never beyond it.
        """
        p_x_BW = p_BWV.gather(-1, x_BW[..., None]).squeeze(-1)
        if self.k == 1:
            return p_x_BW
        near_BWk = self.neighbours_VK[x_BW, 1:]
        p_near_BWk = p_BWV.gather(-1, near_BWk) * self.valid_VK[x_BW, 1:]
        return torch.where(p_x_BW > 0, p_x_BW + self._credit(p_near_BWk), p_x_BW)

    def relaxed_target(self, p_QV: torch.Tensor) -> torch.Tensor:
        """``p~`` at every id (not a distribution: it sums to more than 1); ``(Q, V)``, for bounds and tests."""
        Q, V = p_QV.shape
        ids_QV = torch.arange(V, device=p_QV.device).expand(Q, V)
        return self.credited_mass(p_QV[:, None, :].expand(Q, V, V), ids_QV)

    def added_acceptance(self, p_QV: torch.Tensor, q_QV: torch.Tensor) -> torch.Tensor:
        """``sum_y min(q, p~) - min(q, p)`` per row: the acceptance the relaxation adds for drafts from ``q``,
        which bounds the total variation between the emitted token's law and ``p``."""
        return (torch.minimum(q_QV, self.relaxed_target(p_QV)) - torch.minimum(q_QV, p_QV)).sum(-1)
