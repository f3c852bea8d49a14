"""Decoding: KV cache, temperature / top-k / top-p, classifier-free guidance, per-sample seeds.

:func:`generate` draws one *group* per forward pass, following the same
:class:`~stages.models.sequence.Plan` as training: one forward per token
(``next_token``), per block (``next_block``), per scale (``next_scale``) or per octree level
(``next_level``, ``levels.py``).
With ``use_cache`` each forward runs only the new group's positions against
the KV cache; without it each forward reruns the whole prefix. Both give the
same tokens for the same seed.

Reproducibility: sample ``i`` draws every random number from its own
``torch.Generator`` seeded from ``(seed, i)``, so its tokens do not depend on
which other samples share its batch (up to floating-point reduction order,
exact in float64). Classifier-free guidance runs the conditional and the
unconditional context as two halves of one batch and mixes
``u + s * (c - u)``; ``s`` is constant or ramps linearly from 1 at the first
group to ``cfg_scale`` at the last (VAR's schedule).

Collaborative decoding (CoDe, Chen et al., CVPR 2025) splits a next-scale
pyramid between two models of one vocabulary and tokenizer: the ``model``
(the large *drafter*) draws the first ``handover`` scales, where few tokens
carry the image's content, and a ``refiner`` (a small model) draws the rest,
which hold most of the tokens but mostly detail. The refiner has its own KV
cache: its first pass reads the drafter's tokens as inputs (the prefix) and
predicts its first scale, then it goes on scale by scale. Each model has its
own :class:`SamplingOptions` (CFG scale and schedule); the schedule's
position keeps counting over all scales, and each sample's generator runs on
across the handover, so a refiner that is the drafter draws the drafter's
own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .sequence import Plan, context_coords
from .transformer import KVCache, Transformer
from .vocab import BOS, PAD, VocabLayout

if TYPE_CHECKING:
    from .levels import OctreePlan


@dataclass(frozen=True)
class SamplingOptions:
    """How logits become a distribution; ``temperature=0`` is greedy, ``top_k=0`` and ``top_p=1`` are off.

    ``lookahead`` (in-painting): when the next group holds known tokens, each sample draws this many
    candidates for the current group's free tokens and keeps the one under which the next group's known
    tokens are most likely (one extra forward per candidate), so tokens drawn before known ones agree with
    them; 1 is off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_schedule: Literal["constant", "linear"] = "constant"
    use_cache: bool = True
    lookahead: int = 1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule {self.cfg_schedule!r} is unknown; use 'constant' or 'linear'")
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 (1 = off), got {self.lookahead}")

    def guidance(self, position: float, last: float) -> float:
        """Guidance scale at group (or token) ``position`` of ``0..last``."""
        if self.cfg_schedule == "constant" or last <= 0:
            return self.cfg_scale
        return 1.0 + (self.cfg_scale - 1.0) * position / last

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


@dataclass
class Prompt:
    """What to condition on, per sample: context ids, the CFG context, an optional target prefix.

    ``allowed`` is the ``[start, stop)`` id range sampling may emit (the
    modality's codes); ``prefix_BM`` holds the first ``M`` target tokens
    (global ids), continued rather than generated; ``M`` must end a group.
    ``known_BN`` (global ids, ``-1`` where free) are target tokens kept
    exactly wherever they stand (in/out-painting): each group is drawn as
    usual, then its known positions take their known tokens, which the later
    groups read as their inputs (VAR's masked inference, scale by scale).
    """

    context_BP: torch.Tensor
    uncond_BP: torch.Tensor | None = None
    prefix_BM: torch.Tensor | None = None
    allowed: tuple[int, int] | None = None
    bos_id: int = BOS
    known_BN: torch.Tensor | None = None

    @classmethod
    def from_vocab(cls, vocab: VocabLayout, modality: str, labels: Sequence[Any],
                   prefix_local_BM: torch.Tensor | None = None,
                   prompts: Sequence[dict[str, Sequence[int]] | None] | None = None) -> Prompt:
        """One sample per label (``None`` = unconditional), restricted to ``modality``'s codes; ``prompts``
        gives each sample's prompt-stream tokens (``{"text": ids}``, local ids of the text tokenizer)."""
        prompts = list(prompts) if prompts is not None else [None] * len(labels)
        if len(prompts) != len(labels):
            raise ValueError(f"{len(prompts)} prompts for {len(labels)} labels; give one per sample")
        context = torch.tensor([vocab.context(modality, label, prompt) for label, prompt in zip(labels, prompts)],
                               dtype=torch.long)
        prefix = vocab.to_global(modality, prefix_local_BM) if prefix_local_BM is not None else None
        return cls(context, vocab.unconditional(context), prefix, vocab.code_range(modality))

    @property
    def batch(self) -> int:
        return int(self.context_BP.shape[0])


@dataclass
class Generation:
    """Sampled target tokens (global ids), the log-probability each was drawn with, and the cost."""

    tokens: torch.Tensor    # (B, N) long
    logprobs: torch.Tensor  # (B, N) float64; 0 on prefix tokens
    forward_passes: int     # passes over the whole batch (of both models with a refiner)
    sample_passes: torch.Tensor  # (B,) long: passes each sample took part in until it was complete
    refiner_passes: int = 0      # of forward_passes, those of the refiner (CoDe)
    lengths: torch.Tensor | None = None  # (B,) long: tokens each sample holds (next_level's trees); None: all N


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` under base ``seed``: a well-mixed function of both."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state) & ((1 << 63) - 1))


def process_logits(logits_BQV: torch.Tensor, options: SamplingOptions,
                   allowed: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits -> probabilities (float64): allowed range, temperature, top-k, then top-p."""
    logits = logits_BQV.double()
    V = logits.shape[-1]
    if allowed is not None:
        keep_V = torch.zeros(V, dtype=torch.bool, device=logits.device)
        keep_V[allowed[0]:allowed[1]] = True
        logits = logits.masked_fill(~keep_V, float("-inf"))
    if options.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).double()
    logits = logits / options.temperature
    if options.top_k and options.top_k < V:
        kth = torch.topk(logits, options.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if options.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= options.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def guided_probs(logits_RQV: torch.Tensor, batch: int, scale_BQ: torch.Tensor | None, options: SamplingOptions,
                 allowed: tuple[int, int] | None) -> torch.Tensor:
    """Distributions ``(B, Q, V)`` float64 of rows laid out conditional first, then (with CFG) unconditional:
    ``u + s (c - u)`` at the scales ``scale_BQ``, then :func:`process_logits`."""
    logits = logits_RQV.double()
    if options.guided:
        cond, uncond = logits[:batch], logits[batch:]
        logits = uncond + scale_BQ[:, :, None].to(logits) * (cond - uncond)
    return process_logits(logits, options, allowed)


def guided_context(prompt: Prompt, options: SamplingOptions) -> torch.Tensor:
    """The rows a forward runs: the prompts' contexts, and under guidance their unconditional ones after them."""
    context = prompt.context_BP.long()
    if not options.guided:
        return context
    if prompt.uncond_BP is None:
        raise ValueError("cfg_scale != 1 needs an unconditional context (Prompt.uncond_BP); "
                         "Prompt.from_vocab builds it")
    return torch.cat([context, prompt.uncond_BP.long()])


def inverse_cdf(probs_QV: torch.Tensor, u_Q: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds ``u`` (uniform in [0, 1)), per row; never a zero-probability token."""
    cdf_QV = probs_QV.cumsum(-1)
    idx_Q = torch.searchsorted(cdf_QV, (u_Q.to(cdf_QV) * cdf_QV[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    last_Q = probs_QV.shape[-1] - 1 - (probs_QV > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx_Q, last_Q)


def draw(probs_QV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from ``generator`` (one uniform per row).

    Inverse CDF (rather than ``torch.multinomial``) consumes exactly one number
    per token, so cached and uncached decoding stay in lockstep.
    """
    u_Q = torch.rand(probs_QV.shape[0], generator=generator, dtype=torch.float64)
    return inverse_cdf(probs_QV, u_Q.to(probs_QV.device))


class Session:
    """Buffers shared by the decoders: the laid-out rows (conditional, then unconditional), KV cache, runs.

    Rows are ``[context | N target positions | extra]``; ``extra`` slack
    positions let a decoder that runs fixed-size windows (SJD) run past the end.
    """

    def __init__(self, model: Transformer, plan: Plan, prompt: Prompt, options: SamplingOptions, *,
                 extra: int = 0):
        self.model, self.plan, self.prompt, self.options = model, plan, prompt, options
        config = model.config
        if plan.paradigm != config.paradigm or (plan.paradigm == "next_block"   # a short one: one smaller block
                                                and max(plan.group_sizes) > config.block_size):
            raise ValueError(f"the model was trained as {config.paradigm} (block_size {config.block_size}) but the "
                             f"plan is {plan.paradigm} with groups of {max(plan.group_sizes)}; build the plan with "
                             "plan_for(model.config, ...)")
        if bool(config.feature_dim) != (plan.scale_input is not None):
            raise ValueError("the model was trained with VAR's accumulated next-scale input (feature_dim "
                             f"{config.feature_dim}) but the plan has no ScaleInput; attach the model's own "
                             "(load_scale_inputs) with plan.with_scale_input" if config.feature_dim else
                             "the plan carries a ScaleInput but the model has feature_dim 0 (parent-token input)")
        if prompt.context_BP.shape[1] + plan.n_tokens > config.max_seq_len:
            raise ValueError(f"{prompt.context_BP.shape[1]} context + {plan.n_tokens} target tokens exceed the "
                             f"model's max_seq_len {config.max_seq_len}")
        dev = next(model.parameters()).device
        self.device = dev
        B, N = prompt.batch, plan.n_tokens
        context = guided_context(prompt, options)
        self.B, self.N, self.P, self.R = B, N, context.shape[1], context.shape[0]
        self.T = self.P + N + extra
        self.input_RT = torch.full((self.R, self.T), PAD, dtype=torch.long, device=dev)
        self.input_RT[:, :self.P] = context.to(dev)
        self.features_RTD = self.feature_mask_T = None
        if plan.scale_input is not None:   # VAR's accumulated input, refreshed with the tokens
            self.features_RTD = torch.zeros(self.R, self.T, plan.scale_input.feature_dim, device=dev)
            self.feature_mask_T = torch.zeros(self.T, dtype=torch.bool, device=dev)
            self.feature_mask_T[self.P:self.P + N] = plan.feature_mask_N.to(dev)
        A = plan.coords_NA.shape[1]
        self.coords_TA = torch.zeros(self.T, A, device=dev)
        self.coords_TA[:self.P] = context_coords(self.P, A).to(dev)
        self.coords_TA[self.P:self.P + N] = plan.coords_NA.to(dev)
        self.group_T = torch.full((self.T,), plan.n_groups + 1, dtype=torch.long, device=dev)
        self.group_T[:self.P] = 0
        self.group_T[self.P:self.P + N] = plan.group_N.to(dev) + 1
        # drafts may run past the end (SJD): the token buffer has the same slack as the rows
        self.tokens_BN = torch.full((B, N + extra), PAD, dtype=torch.long, device=dev)
        self.sample_passes_B = torch.zeros(B, dtype=torch.long, device=dev)
        self.logprobs_BN = torch.zeros(B, N, dtype=torch.float64, device=dev)
        self.known = 0
        if prompt.prefix_BM is not None:
            M = prompt.prefix_BM.shape[1]
            if prompt.prefix_BM.shape[0] != B or M > N:
                raise ValueError(f"prefix of shape {tuple(prompt.prefix_BM.shape)} does not fit {B} samples "
                                 f"of {N} tokens")
            self.tokens_BN[:, :M] = prompt.prefix_BM.long().to(dev)
            self.known = M
        self.known_BN = None
        if prompt.known_BN is not None:
            if tuple(prompt.known_BN.shape) != (B, N):
                raise ValueError(f"known tokens of shape {tuple(prompt.known_BN.shape)} do not fit {B} samples "
                                 f"of {N} tokens")
            self.known_BN = prompt.known_BN.long().to(dev)
        self.cache: KVCache | None = model.new_cache(self.R, self.T) if options.use_cache else None
        self.forward_passes = 0

    def generators(self, seed: int, sample_indices: Sequence[int] | None) -> list[torch.Generator]:
        indices = list(range(self.B)) if sample_indices is None else list(sample_indices)
        if len(indices) != self.B:
            raise ValueError(f"{len(indices)} sample indices for {self.B} samples")
        return [sample_generator(seed, i) for i in indices]

    def refresh_inputs(self) -> None:
        """Target positions' inputs from the current tokens (unknown sources read PAD, never attended)."""
        inputs_BN = self.plan.inputs(self.tokens_BN[:, :self.N], self.prompt.bos_id)
        self.input_RT[:, self.P:self.P + self.N] = inputs_BN.repeat(self.R // self.B, 1)
        if self.features_RTD is not None:
            features_BND = self.plan.scale_input.features(self.tokens_BN[:, :self.N])
            self.features_RTD[:, self.P:self.P + self.N] = features_BND.to(self.features_RTD).repeat(
                self.R // self.B, 1, 1)

    def _features(self, pos: slice | torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The feature inputs of positions ``pos`` (a slice, or ``(R, Q)`` per-row positions)."""
        if self.features_RTD is None:
            return {}
        if isinstance(pos, slice):
            return {"features_BLD": self.features_RTD[:, pos],
                    "feature_mask_BL": self.feature_mask_T[pos].expand(self.R, -1)}
        rows_R1 = torch.arange(self.R, device=self.device)[:, None]
        return {"features_BLD": self.features_RTD[rows_R1, pos], "feature_mask_BL": self.feature_mask_T[pos]}

    @torch.no_grad()
    def run(self, begin: int | torch.Tensor, length: int) -> torch.Tensor:
        """Logits ``(R, length, V)`` of positions ``[begin, begin + length)`` (per row when a tensor)."""
        self.forward_passes += 1
        if isinstance(begin, int):
            if self.cache is not None:  # every row at the same offset: plain slices
                end = begin + length
                logits, _ = self.model(self.input_RT[:, begin:end], self.coords_TA[begin:end].expand(self.R, -1, -1),
                                       self.group_T[begin:end].expand(self.R, -1), cache=self.cache, start=begin,
                                       **self._features(slice(begin, end)))
                return logits
            begin = torch.full((self.R,), begin, dtype=torch.long, device=self.device)
        pos_RQ = begin[:, None] + torch.arange(length, device=self.device)
        if self.cache is not None:
            ids_RQ = torch.gather(self.input_RT, 1, pos_RQ)
            logits, _ = self.model(ids_RQ, self.coords_TA[pos_RQ], self.group_T[pos_RQ], cache=self.cache,
                                   start=begin, **self._features(pos_RQ))
            return logits
        end = int(pos_RQ.max()) + 1
        logits, _ = self.model(self.input_RT[:, :end], self.coords_TA[:end].expand(self.R, -1, -1),
                               self.group_T[:end].expand(self.R, -1), **self._features(slice(0, end)))
        return torch.gather(logits, 1, pos_RQ[:, :, None].expand(-1, -1, logits.shape[-1]))

    def probs(self, logits_RQV: torch.Tensor, scale_BQ: torch.Tensor | None) -> torch.Tensor:
        """Guided, processed distributions ``(B, Q, V)`` float64."""
        return guided_probs(logits_RQV, self.B, scale_BQ, self.options, self.prompt.allowed)

    def scales(self, position_BQ: torch.Tensor, last: int) -> torch.Tensor:
        return torch.tensor([[self.options.guidance(float(p), last) for p in row] for row in position_BQ.tolist()],
                            dtype=torch.float64, device=self.device)

    def result(self) -> Generation:
        return Generation(self.tokens_BN[:, :self.N].clone(), self.logprobs_BN, self.forward_passes,
                          self.sample_passes_B)


def _draw_group(s: Session, probs_QV: torch.Tensor, gen: torch.Generator, b: int, lo: int,
                hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``b``'s tokens of one group and their log-probabilities; known tokens (in-painting) kept, at 0."""
    tok_Q = draw(probs_QV, gen)
    logp_Q = probs_QV.gather(-1, tok_Q[:, None]).squeeze(-1).log()
    if s.known_BN is not None:
        known_Q = s.known_BN[b, lo:hi]
        tok_Q = torch.where(known_Q >= 0, known_Q, tok_Q)
        logp_Q = torch.where(known_Q >= 0, torch.zeros_like(logp_Q), logp_Q)
    return tok_Q, logp_Q


def _known_ahead(s: Session, bounds: list[int], g: int) -> bool:
    """Whether group ``g`` has free tokens and the next group known ones (where lookahead can choose)."""
    if s.known_BN is None or g + 2 >= len(bounds):
        return False
    here, ahead = s.known_BN[:, bounds[g]:bounds[g + 1]], s.known_BN[:, bounds[g + 1]:bounds[g + 2]]
    return bool((here < 0).any()) and bool((ahead >= 0).any())


def _look_ahead(s: Session, probs_BQV: torch.Tensor, gens: list[torch.Generator], bounds: list[int], g: int,
                first: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Of ``lookahead`` candidate draws of group ``g`` per sample (``first`` and more), the one under which the
    next group's known tokens are most likely. Each scoring pass writes the next group's cache slots, which
    the next group's own pass writes again."""
    lo, hi, nxt = bounds[g], bounds[g + 1], bounds[g + 2]
    candidates = [first] + [[_draw_group(s, probs_BQV[b], gen, b, lo, hi) for b, gen in enumerate(gens)]
                            for _ in range(s.options.lookahead - 1)]
    known_BQ = s.known_BN[:, hi:nxt]
    scale_BQ = torch.full((s.B, nxt - hi), s.options.guidance(g + 1, len(bounds) - 2), dtype=torch.float64)
    scores = torch.empty(len(candidates), s.B, dtype=torch.float64)
    for k, drawn in enumerate(candidates):
        for b, (tok_Q, _logp) in enumerate(drawn):
            s.tokens_BN[b, lo:hi] = tok_Q
        s.refresh_inputs()
        begin = s.P + hi if s.cache is not None else 0
        probs_next = s.probs(s.run(begin, s.P + nxt - begin)[:, -(nxt - hi):], scale_BQ)
        logp_BQ = probs_next.gather(-1, known_BQ.clamp_min(0)[:, :, None]).squeeze(-1).clamp_min(1e-300).log()
        scores[k] = torch.where(known_BQ >= 0, logp_BQ, torch.zeros_like(logp_BQ)).sum(1).cpu()
    s.sample_passes_B += len(candidates)
    best_B = scores.argmax(0)
    return [candidates[int(best_B[b])][b] for b in range(s.B)]


@torch.no_grad()
def generate(model: Transformer, plan: Plan | OctreePlan, prompt: Prompt, options: SamplingOptions = SamplingOptions(), *,
             seed: int = 0, sample_indices: Sequence[int] | None = None, refiner: Transformer | None = None,
             handover: int | None = None, refiner_options: SamplingOptions | None = None) -> Generation:
    """Sample ``plan.n_tokens`` tokens per prompt row, one forward pass per group.

    With a ``refiner`` (CoDe, next_scale plans), ``model`` draws groups ``0..handover-1`` and ``refiner``
    the rest, under ``refiner_options`` (default ``options``); in-painting's lookahead at the last drafted
    group is judged by the drafter.

    ``sample_indices`` name the rows' samples (default ``0..B-1``): the row of
    sample ``i`` is the same whatever batch it is drawn in. A ``masked`` plan is decoded by MaskGIT's
    parallel decoding with its default steps (``maskgit.generate_masked`` takes them); a ``next_level`` plan
    (``levels.OctreePlan``) one octree level per forward (``levels.generate_levels``).
    """
    handover = _check_refiner(model, plan, refiner, handover, refiner_options)
    if plan.paradigm == "masked":
        from .maskgit import generate_masked

        return generate_masked(model, plan, prompt, options, seed=seed, sample_indices=sample_indices)
    if plan.paradigm == "next_level":
        from .levels import generate_levels

        return generate_levels(model, plan, prompt, options, seed=seed, sample_indices=sample_indices)
    s = Session(model, plan, prompt, options)
    gens = s.generators(seed, sample_indices)
    first = plan.group_at(s.known)
    _draw_groups(s, gens, range(first, max(first, handover)))
    if refiner is None:
        return s.result()
    r = Session(refiner, plan, prompt, refiner_options or options)
    r.tokens_BN.copy_(s.tokens_BN)     # the drafted scales: the refiner's prefix, read in its first pass
    r.logprobs_BN.copy_(s.logprobs_BN)
    _draw_groups(r, gens, range(max(first, handover), plan.n_groups))
    return Generation(r.tokens_BN[:, :r.N].clone(), r.logprobs_BN, s.forward_passes + r.forward_passes,
                      s.sample_passes_B + r.sample_passes_B.to(s.device), refiner_passes=r.forward_passes)


def _draw_groups(s: Session, gens: list[torch.Generator], groups: range) -> None:
    """Draw ``groups`` in order, one forward each. With the KV cache the first pass runs every position up to
    the first group's end (the context and any tokens drawn before: none of them cached yet), the next ones
    only their own group."""
    bounds, last = s.plan.group_bounds, s.plan.n_groups - 1
    done = 0
    for g in groups:
        lo, hi = bounds[g], bounds[g + 1]
        s.refresh_inputs()
        end = s.P + hi
        begin = done if s.cache is not None else 0
        logits_RQV = s.run(begin, end - begin)[:, -(hi - lo):]
        s.sample_passes_B += 1
        scale_BQ = torch.full((s.B, hi - lo), s.options.guidance(g, last), dtype=torch.float64)
        probs_BQV = s.probs(logits_RQV, scale_BQ)
        drawn = [_draw_group(s, probs_BQV[b], gen, b, lo, hi) for b, gen in enumerate(gens)]
        if s.options.lookahead > 1 and _known_ahead(s, bounds, g):
            drawn = _look_ahead(s, probs_BQV, gens, bounds, g, drawn)
        for b, (tok_Q, logp_Q) in enumerate(drawn):
            s.tokens_BN[b, lo:hi] = tok_Q
            s.logprobs_BN[b, lo:hi] = logp_Q
        done = end


def _check_refiner(model: Transformer, plan: Plan, refiner: Transformer | None, handover: int | None,
                   refiner_options: SamplingOptions | None) -> int:
    """The number of groups ``model`` draws: all of them without a refiner, else ``handover`` (checked)."""
    if refiner is None:
        if handover is not None or refiner_options is not None:
            raise ValueError("handover and refiner_options apply to a refiner (CoDe); pass refiner= too")
        return plan.n_groups
    if plan.paradigm != "next_scale":
        raise ValueError(f"a refiner (CoDe) draws the last scales of a next_scale plan; this plan is "
                         f"{plan.paradigm}")
    if handover is None or not 1 <= handover <= plan.n_groups - 1:
        raise ValueError(f"handover {handover} is not a number of scales the drafter draws before the refiner; "
                         f"give 1..{plan.n_groups - 1} for this plan of {plan.n_groups} scales")
    ours, theirs = model.config, refiner.config
    differ = [f"{k} {getattr(ours, k)} vs {getattr(theirs, k)}" for k in ("paradigm", "feature_dim", "vocab_size")
              if getattr(ours, k) != getattr(theirs, k)]
    if differ:
        raise ValueError(f"the refiner does not read the drafter's tokens as the drafter does ({', '.join(differ)}); "
                         "use two models trained on the same tokens")
    return handover
