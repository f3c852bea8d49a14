"""Speculative Jacobi decoding (SJD, Teng et al. 2024) for ``next_token`` models.

Each row keeps a window of ``W`` draft tokens beyond its accepted prefix,
each with the distribution ``q`` it was drawn from. One forward pass over the
window gives the model's distributions ``p`` at all ``W`` positions (causal,
so position ``j`` sees the drafts before it). Drafts are verified left to
right: draft ``x`` is accepted with probability ``min(1, p(x) / q(x))``; the
first rejected one is replaced by a draw from ``norm(max(0, p - q))`` and
ends the pass. The drafts after it are re-drafted from this pass's ``p``
(the Jacobi step: their contexts were not final yet), and the window is
refilled with fresh drafts drawn uniformly over the allowed codes.

This is speculative sampling's accept/reject rule applied to drafts drawn
independently of the verification randomness, so every accepted token is
distributed exactly as plain sampling would draw it; the first draft's
context is always final, so each pass accepts at least one token and SJD
never needs more passes than :func:`~stages.models.sampling.generate`.
Rows advance unevenly: each writes its window at its own KV-cache offset.
Each active row draws ``2W + 1`` uniforms per pass from its own generator
(accept tests, one residual draw, the next window's drafts), so a sample's
tokens do not depend on its batch.

With a :class:`~stages.models.lantern.Relaxation` (LANTERN, ``relaxed:`` in
the sample stage) a draft is accepted with probability ``min(1, p~(x) / q(x))``,
``p~(x)`` being ``p``'s mass over the draft's latent neighbourhood: longer
accepted runs for a total-variation distance to plain sampling bounded in
:mod:`~stages.models.lantern`. Everything else, the residual included, is
unchanged, and with ``k = 1`` the accept test compares the very same numbers,
so the samples are SJD's bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lantern import Relaxation
from .sampling import Generation, Prompt, SamplingOptions, Session, draw, inverse_cdf
from .sequence import Plan
from .transformer import Transformer


@torch.no_grad()
def generate_sjd(model: Transformer, plan: Plan, prompt: Prompt, options: SamplingOptions = SamplingOptions(),
                 *, seed: int = 0, sample_indices: Sequence[int] | None = None, window: int = 16,
                 relaxation: Relaxation | None = None) -> Generation:
    """Like :func:`~stages.models.sampling.generate` for a ``next_token`` plan, in fewer forward passes;
    ``relaxation`` (LANTERN) trades a bounded distance to its distribution for fewer still."""
    if any(n != 1 for n in plan.group_sizes):
        raise ValueError(f"speculative Jacobi decoding applies to next_token plans, not {plan.paradigm}; "
                         "use generate() for block and scale paradigms (already one pass per group)")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if prompt.known_BN is not None:
        raise ValueError("in-painting keeps known tokens group by group; use generate() (decoder: plain)")
    if relaxation is not None and relaxation.neighbours_VK.shape[0] != model.config.vocab_size:
        raise ValueError(f"the relaxation covers {relaxation.neighbours_VK.shape[0]} ids but the model's vocabulary "
                         f"has {model.config.vocab_size}; build it with vocab_size=model.config.vocab_size")
    s = Session(model, plan, prompt, options, extra=window)
    gens = s.generators(seed, sample_indices)
    B, N, P, W = s.B, s.N, s.P, window
    dev = s.device
    V = model.config.vocab_size
    lo, hi = prompt.allowed if prompt.allowed is not None else (0, V)
    uniform_V = torch.zeros(V, dtype=torch.float64, device=dev)
    uniform_V[lo:hi] = 1.0 / (hi - lo)
    rows_B, j_W = torch.arange(B, device=dev), torch.arange(W, device=dev)
    if relaxation is not None:
        relaxation = relaxation.to(dev)

    n_B = torch.full((B,), s.known, dtype=torch.long, device=dev)  # accepted tokens per row
    q_BWV = uniform_V.expand(B, W, V).clone()                       # draft distributions of the window
    for b, gen in enumerate(gens):
        s.tokens_BN[b, s.known:s.known + W] = draw(q_BWV[b], gen)

    first = True
    while bool((n_B < N).any()):
        active_B = n_B < N
        s.refresh_inputs()
        if first and s.cache is not None:  # the first pass also fills the cache with context and prefix
            logits_RQV = s.run(0, P + s.known + W)[:, -W:]
        else:
            logits_RQV = s.run((P + n_B).repeat(s.R // B), W)
        first = False
        s.sample_passes_B += active_B.long()
        pos_BW = n_B[:, None] + j_W
        p_BWV = s.probs(logits_RQV, s.scales(pos_BW, N - 1) if options.guided else None)
        u_BK = torch.stack([torch.rand(2 * W + 1, generator=g, dtype=torch.float64) if bool(a) else
                            torch.zeros(2 * W + 1, dtype=torch.float64) for g, a in zip(gens, active_B.tolist(),
                                                                                       strict=True)]).to(dev)

        # verify the window left to right
        width_B = (N - n_B).clamp(0, W)
        in_window_BW = j_W < width_B[:, None]
        x_BW = torch.gather(s.tokens_BN, 1, pos_BW)
        p_x_BW = p_BWV.gather(-1, x_BW[..., None]).squeeze(-1)
        q_x_BW = q_BWV.gather(-1, x_BW[..., None]).squeeze(-1)
        # LANTERN credits each draft with its latent neighbourhood's mass; k = 1 compares p(x) itself
        target_BW = p_x_BW if relaxation is None else relaxation.credited_mass(p_BWV, x_BW)
        fail_BW = (u_BK[:, :W] * q_x_BW >= target_BW) & in_window_BW
        rejected_B = fail_BW.any(1)
        first_fail_B = torch.where(rejected_B, fail_BW.int().argmax(1), width_B)
        accepted_B = torch.where(rejected_B, first_fail_B + 1, width_B) * active_B

        # the first rejected draft is redrawn from the residual norm(max(0, p - q))
        at_B = first_fail_B.clamp(max=W - 1)
        residual_BV = (p_BWV[rows_B, at_B] - q_BWV[rows_B, at_B]).clamp_min(0)
        residual_BV = torch.where(rejected_B[:, None], residual_BV, uniform_V)
        redrawn_B = inverse_cdf(residual_BV / residual_BV.sum(-1, keepdim=True), u_BK[:, W])
        fix_B = rejected_B & active_B
        s.tokens_BN[rows_B[fix_B], (n_B + at_B)[fix_B]] = redrawn_B[fix_B]

        keep_BW = (j_W < accepted_B[:, None]) & active_B[:, None]
        final_BW = torch.gather(s.tokens_BN, 1, pos_BW)
        lp_BW = p_BWV.gather(-1, final_BW[..., None]).squeeze(-1).log()
        s.logprobs_BN[rows_B[:, None].expand_as(pos_BW)[keep_BW], pos_BW[keep_BW]] = lp_BW[keep_BW]

        # next window: Jacobi re-drafts from p after a rejection, fresh uniform drafts beyond the old window
        src_BW = accepted_B[:, None] + j_W
        from_p_BW = rejected_B[:, None] & (src_BW < width_B[:, None])
        dist_BWV = torch.where(from_p_BW[..., None], p_BWV[rows_B[:, None], src_BW.clamp(max=W - 1)], uniform_V)
        drafts_BW = inverse_cdf(dist_BWV.reshape(B * W, V), u_BK[:, W + 1:].reshape(-1)).view(B, W)
        n_B = n_B + accepted_B
        write_BW = active_B[:, None] & (n_B[:, None] + j_W < N)
        new_pos_BW = n_B[:, None] + j_W
        s.tokens_BN[rows_B[:, None].expand_as(new_pos_BW)[write_BW], new_pos_BW[write_BW]] = drafts_BW[write_BW]
        q_BWV = torch.where(active_B[:, None, None], dist_BWV, q_BWV)
    return s.result()
