"""The ``masked`` paradigm: MaskGIT's masked training and confidence-ordered parallel decoding.

MaskGIT (Chang et al., CVPR 2022; Meissonic's masked generative transformer
follows it) predicts every target token at once from a partly masked copy of
the sequence, with bidirectional attention (``sequence.make_plan``: one group).

Training (:func:`mask_for_training`): per document, draw ``r ~ U[0, 1)``, mask
``ceil(gamma(r) N)`` of its ``N`` target tokens chosen uniformly (at least one),
with the cosine schedule ``gamma(r) = cos(pi r / 2)``; the inputs there become
``MASK`` and only they are scored.

Sampling (:func:`generate_masked`): start with every free token masked; at step
``t`` of ``T`` one forward predicts all positions, a token is drawn at each
masked one (temperature, top-k/top-p, CFG as elsewhere), and, with
``ratio = (t + 1) / T``, the ``n = max(1, min(unknown - 1, floor(N0 gamma(ratio))))``
least confident drawn tokens are masked again, where ``N0`` is the number of
tokens masked at the start and the confidence is ``log p(drawn) + tau (1 - ratio) g``
with Gumbel noise ``g`` and ``tau`` the choice temperature (MaskGIT's 4.5,
annealed to 0). The last step keeps every draw. Known tokens (a prefix,
in-painting) start unmasked and stay. Each sample draws its numbers from its
own generator, in a fixed order (one uniform per position for the tokens, then
one per position for the noise), so its tokens do not depend on its batch.

Likelihood: a masked model has no left-to-right factorization of its own; the
held-out NLL (:func:`sequential_nll`) is that of decoding one token per step
in raster order, ``sum_i log p(x_i | x_<i, MASK elsewhere)``, a proper
distribution over sequences (``N`` forwards per batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from .sampling import Generation, Prompt, SamplingOptions, Session, draw
from .sequence import IGNORE_INDEX, ModelInputs, Plan, batch_inputs, target_documents
from .transformer import Transformer
from .vocab import MASK

SCHEDULES = ("cosine", "linear")


def mask_ratio(r: float, schedule: str = "cosine") -> float:
    """``gamma(r)``: the share of tokens masked at progress ``r`` in [0, 1] (1 at 0, 0 at 1)."""
    if schedule == "cosine":
        return math.cos(math.pi / 2 * r)
    if schedule == "linear":
        return 1.0 - r
    raise ValueError(f"masking schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class MaskedDecoding:
    """How many parallel steps, the schedule of masked shares, and MaskGIT's choice temperature."""

    steps: int = 8
    schedule: Literal["cosine", "linear"] = "cosine"
    choice_temperature: float = 4.5

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"masking schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")

    def still_masked(self, t: int, start: int, unknown: int) -> int:
        """Tokens left masked after step ``t`` (0-based) when ``start`` were masked before step 0 and
        ``unknown`` are before step ``t``: MaskGIT's rule, and none after the last step."""
        if t >= self.steps - 1 or unknown == 0:
            return 0
        target = math.floor(start * mask_ratio((t + 1) / self.steps, self.schedule))
        return max(1, min(unknown - 1, target))


def mask_for_training(inputs: ModelInputs, generator: torch.Generator) -> ModelInputs:
    """MaskGIT's training inputs from ``batch_inputs``/``pack_documents`` of a ``masked`` plan: per document,
    ``ceil(cos(pi r / 2) N)`` of its ``N`` targets (``r ~ U[0, 1)``, at least one) read ``MASK`` and are
    the only ones scored. One draw of ``r`` and one permutation per document, from ``generator`` (CPU)."""
    scored_BL = inputs.target_ids != IGNORE_INDEX
    input_ids, target_ids = inputs.input_ids.clone(), inputs.target_ids.clone()
    keep_BL = torch.zeros_like(scored_BL)
    for b, pos in target_documents(inputs):
        n = len(pos)
        r = float(torch.rand((), generator=generator, dtype=torch.float64))
        k = min(n, max(1, math.ceil(mask_ratio(r) * n)))
        chosen = pos[torch.randperm(n, generator=generator)[:k].to(pos.device)]
        keep_BL[b, chosen] = True
    input_ids[keep_BL] = MASK
    target_ids[scored_BL & ~keep_BL] = IGNORE_INDEX
    return replace(inputs, input_ids=input_ids, target_ids=target_ids)


def gumbel(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` standard Gumbel numbers (float64) from ``generator``."""
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def generate_masked(model: Transformer, plan: Plan, prompt: Prompt, options: SamplingOptions = SamplingOptions(),
                    decoding: MaskedDecoding = MaskedDecoding(), *, seed: int = 0,
                    sample_indices: Sequence[int] | None = None) -> Generation:
    """Sample a ``masked`` model's ``plan.n_tokens`` tokens per prompt row in ``decoding.steps`` forwards.

    Every forward runs the whole sequence (bidirectional: no KV cache). CFG mixes the conditional and
    unconditional logits with the scale of step ``t`` of ``steps`` (``options.cfg_schedule``).
    """
    if plan.paradigm != "masked":
        raise ValueError(f"generate_masked decodes masked plans; this one is {plan.paradigm} (use generate())")
    s = Session(model, plan, prompt, replace(options, use_cache=False, lookahead=1))
    gens = s.generators(seed, sample_indices)
    B, N, P = s.B, s.N, s.P
    tokens_BN = torch.full((B, N), MASK, dtype=torch.long, device=s.device)
    if s.known:
        tokens_BN[:, :s.known] = s.tokens_BN[:, :s.known]
    if s.known_BN is not None:
        tokens_BN = torch.where(s.known_BN >= 0, s.known_BN, tokens_BN)
    start_B = (tokens_BN == MASK).sum(1).tolist()
    for t in range(decoding.steps):
        unknown_BN = tokens_BN == MASK
        if not bool(unknown_BN.any()):
            break
        s.input_RT[:, P:P + N] = tokens_BN.repeat(s.R // B, 1)
        logits_RNV = s.run(0, P + N)[:, P:]
        s.sample_passes_B += 1
        scale_BN = torch.full((B, N), options.guidance(t, decoding.steps - 1), dtype=torch.float64)
        probs_BNV = s.probs(logits_RNV, scale_BN)
        ratio = (t + 1) / decoding.steps
        for b, gen in enumerate(gens):
            unknown_N = unknown_BN[b]
            drawn_N = draw(probs_BNV[b], gen)
            noise_N = gumbel(N, gen).to(s.device)
            logp_N = probs_BNV[b].gather(-1, drawn_N[:, None]).squeeze(-1).log()
            remask = decoding.still_masked(t, start_B[b], int(unknown_N.sum()))
            fix_N = unknown_N.clone()
            if remask:
                confidence_N = logp_N + decoding.choice_temperature * (1 - ratio) * noise_N
                confidence_N = confidence_N.masked_fill(~unknown_N, float("inf"))
                order_N = torch.sort(confidence_N, stable=True).indices
                fix_N[order_N[:remask]] = False
            tokens_BN[b, fix_N] = drawn_N[fix_N]
            s.logprobs_BN[b, fix_N] = logp_N[fix_N]
    s.tokens_BN[:, :N] = tokens_BN
    return s.result()


@torch.no_grad()
def sequential_nll(model: Transformer, plan: Plan, targets_BN: torch.Tensor, context_BP: torch.Tensor) -> torch.Tensor:
    """Per-row NLL (nats, float64) of ``targets_BN`` decoded one token per step in raster order:
    ``-sum_i log p(x_i | x_<i known, the rest MASK)`` (``N`` forwards over the batch)."""
    inputs = batch_inputs(plan, targets_BN, context_BP)
    P, N = context_BP.shape[1], plan.n_tokens
    ids = inputs.input_ids.clone()
    ids[:, P:] = MASK
    nll_B = torch.zeros(targets_BN.shape[0], dtype=torch.float64, device=targets_BN.device)
    for i in range(N):
        logits, _ = model(ids, inputs.coords, inputs.group_ids)
        logp_BV = torch.log_softmax(logits[:, P + i].double(), dim=-1)
        nll_B -= logp_BV.gather(-1, targets_BN[:, i:i + 1].long()).squeeze(-1)
        ids[:, P + i] = targets_BN[:, i]
    return nll_B
