"""LANTERN's relaxed acceptance for speculative Jacobi decoding, against the paper's definition:
k = 1 (or delta = 0) is SJD bit for bit; neighbourhoods are the nearest codes of the codebook within the mass
budget; the law of the emitted tokens is the one the rule implies, and its distance to the model's
distribution stays within the bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from test_models_sampling import VOCAB, tiny_model  # the sampling tests' vocabulary and tiny next_token model

from arpipe.stages.models import (
    ModelConfig,
    Prompt,
    Relaxation,
    SamplingOptions,
    VocabLayout,
    code_neighbours,
    generate_sjd,
    make_plan,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def line_codebook(points: list[float]) -> torch.Tensor:
    """Codes on a line: the neighbourhoods are easy to read off (grey levels are such a codebook)."""
    return torch.tensor(points, dtype=torch.float32)[:, None]


def relaxation(k: int, delta: float, vocab: VocabLayout = VOCAB, modality: str = "image") -> Relaxation:
    size = dict(vocab.modalities)[modality]
    return Relaxation.from_codebook(line_codebook([float(i) for i in range(size)]), k=k, delta=delta,
                                    start=vocab.code_range(modality)[0], vocab_size=vocab.vocab_size)


def test_a_codes_neighbourhood_is_itself_then_its_nearest_codes():
    near = code_neighbours(line_codebook([0.0, 1.0, 3.0, 3.0, 7.0]), 3)
    assert near.tolist() == [[0, 1, 2], [1, 0, 2], [2, 3, 1], [3, 2, 1], [4, 2, 3]]   # ties: lower index first
    table = Relaxation.from_codebook(line_codebook([0.0, 1.0, 3.0, 3.0, 7.0]), k=3, delta=0.1, start=6,
                                     vocab_size=12)
    assert table.neighbours_VK[6:11].tolist() == (near + 6).tolist()              # global ids
    assert table.neighbours_VK[:6, 0].tolist() == list(range(6))                  # specials: themselves alone
    assert not table.valid_VK[:6, 1:].any() and not table.valid_VK[11:, 1:].any()
    with pytest.raises(ValueError, match="k must lie in"):
        code_neighbours(line_codebook([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="probability budget"):
        relaxation(2, 1.5)


def test_neighbours_join_nearest_first_while_their_mass_stays_within_delta():
    """A(x) of the paper: the longest prefix of x's neighbours whose total stays <= delta, credited to x."""
    table = Relaxation.from_codebook(line_codebook([0.0, 1.0, 2.0, 3.0]), k=4, delta=0.3, start=0, vocab_size=4)
    p_QV = torch.tensor([[0.1, 0.2, 0.05, 0.65]], dtype=torch.float64)
    credited = table.relaxed_target(p_QV)[0]
    # code 0: neighbours 1 (0.2), 2 (0.25 in all), 3 (0.9: over) -> 0.1 + 0.25
    # code 2: neighbours 1 (0.2), 3 (0.85: over; 1 and 3 are as near, the lower index first) -> 0.05 + 0.2
    # code 3: neighbours 2 (0.05), 1 (0.25), 0 (0.35: over) -> 0.65 + 0.25
    assert credited.tolist() == pytest.approx([0.35, 0.2 + 0.15, 0.05 + 0.2, 0.9])
    assert float((credited - p_QV[0]).max()) <= 0.3          # the mass moved onto a code stays within delta


@pytest.mark.parametrize("k,delta", [(1, 0.5), (4, 0.0)])
def test_k_one_or_no_budget_draws_exactly_sjds_samples(k, delta):
    """Same seeds, same tokens, log-probabilities and passes: the relaxation changes nothing it should not."""
    model, plan = tiny_model("next_token"), make_plan("next_token", grid=(3, 4), n_axes=3)
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1, 2, 3, None, 1])
    for opts in (dict(), dict(cfg_scale=2.0, cfg_schedule="linear", top_k=6, top_p=0.9, temperature=0.8)):
        sjd = generate_sjd(model, plan, prompt, SamplingOptions(**opts), seed=5, window=4)
        relaxed = generate_sjd(model, plan, prompt, SamplingOptions(**opts), seed=5, window=4,
                               relaxation=relaxation(k, delta))
        assert torch.equal(relaxed.tokens, sjd.tokens) and torch.equal(relaxed.logprobs, sjd.logprobs)
        assert torch.equal(relaxed.sample_passes, sjd.sample_passes)
        assert relaxed.forward_passes == sjd.forward_passes


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits ignore the context: every position has the same known ``p``."""

    def __init__(self, vocab: VocabLayout, logits_V: torch.Tensor, n_tokens: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab.vocab_size, n_layer=1, n_head=1, n_embd=8, rope_axes=2,
                                  max_seq_len=vocab.context_len + n_tokens + 8)
        self.logits_V = torch.nn.Parameter(logits_V.double(), requires_grad=False)

    def forward(self, ids_RL: torch.Tensor, *_args, **_kwargs) -> tuple[torch.Tensor, None]:
        R, L = ids_RL.shape
        return self.logits_V.expand(R, L, -1), None


def test_relaxed_tokens_follow_the_rules_law_within_the_total_variation_bound(record_property):
    """8 codes on a line, a fixed p, uniform drafts (window 1: every draft is fresh). The emitted tokens'
    law is P = min(q, p~) + (1 - sum min(q, p~)) norm(max(0, p - q)); its distance to p is at most the
    acceptance the relaxation adds, and far more drafts are accepted than SJD accepts."""
    vocab = VocabLayout.build({"x": 8})
    lo, hi = vocab.code_range("x")
    logits_V = torch.full((vocab.vocab_size,), -30.0, dtype=torch.float64)
    logits_V[lo:hi] = torch.log(torch.tensor([0.02, 0.05, 0.30, 0.08, 0.04, 0.25, 0.20, 0.06], dtype=torch.float64))
    n_samples, n_tokens = 4000, 16
    model, plan = FixedLogits(vocab, logits_V, n_tokens), make_plan("next_token", n_tokens=n_tokens, n_axes=2)
    prompt = Prompt.from_vocab(vocab, "x", [None] * n_samples)
    opts = SamplingOptions(use_cache=False)
    lantern = Relaxation.from_codebook(line_codebook([0, 1, 2, 3, 4, 5, 6, 7]), k=3, delta=0.1, start=lo,
                                       vocab_size=vocab.vocab_size)

    p_V = torch.zeros(vocab.vocab_size, dtype=torch.float64)
    p_V[lo:hi] = torch.softmax(logits_V[lo:hi], -1)
    p, q = p_V[None, lo:hi], torch.full((1, 8), 1 / 8, dtype=torch.float64)
    p_rel = lantern.relaxed_target(p_V[None])[:, lo:hi]
    accepted = torch.minimum(q, p_rel)
    residual = (p - q).clamp_min(0)
    law = (accepted + (1 - accepted.sum()) * residual / residual.sum())[0]
    bound = float((accepted - torch.minimum(q, p)).sum())
    tv_law = 0.5 * float((law - p[0]).abs().sum())
    assert abs(float(law.sum()) - 1) < 1e-12 and tv_law <= bound + 1e-12

    out = generate_sjd(model, plan, prompt, opts, seed=0, window=1, relaxation=lantern)
    sjd = generate_sjd(model, plan, prompt, opts, seed=0, window=1)
    n = n_samples * n_tokens
    seen = torch.bincount((out.tokens - lo).reshape(-1), minlength=8).double()
    assert chisquare(seen.numpy(), (law * n).numpy()).pvalue > 1e-3, "the tokens do not follow the rule's law"
    tv_seen = 0.5 * float((seen / n - p[0]).abs().sum())
    tolerance = float(np.sqrt(8 / n))    # >= 2 standard errors of an empirical TV over 8 cells
    record_property("lantern_tv", round(tv_seen, 4))
    record_property("lantern_tv_bound", round(bound, 4))
    print(f"TV to p: seen {tv_seen:.4f}, law {tv_law:.4f}, bound {bound:.4f} (delta 0.1, k 3)")
    assert tv_seen <= bound + tolerance
    sjd_seen = torch.bincount((sjd.tokens - lo).reshape(-1), minlength=8).double()
    assert chisquare(sjd_seen.numpy(), (p[0] * n).numpy()).pvalue > 1e-3   # SJD itself stays exact
    # accepted drafts: one pass per token here, so acceptance = 1 - share of rejected (residual) draws
    assert float(accepted.sum()) > float(torch.minimum(q, p).sum()) + 0.1


def test_the_sample_stage_takes_relaxed_only_with_sjd():
    from pydantic import ValidationError

    from arpipe.schemas.sample import SampleStage as SampleSpec

    spec = SampleSpec.model_validate({"kind": "sample", "model": "m", "decoder": "sjd",
                                      "relaxed": {"k": 8, "delta": 0.2}})
    assert spec.relaxed.k == 8
    with pytest.raises(ValidationError, match="relaxed .LANTERN. relaxes speculative Jacobi decoding"):
        SampleSpec.model_validate({"kind": "sample", "model": "m", "relaxed": {"k": 8, "delta": 0.2}})
    for bad in ({"k": 0, "delta": 0.2}, {"k": 2, "delta": 1.5}, {"k": 2}):
        with pytest.raises(ValidationError):
            SampleSpec.model_validate({"kind": "sample", "model": "m", "decoder": "sjd", "relaxed": bad})
