"""Decoding: KV cache = no cache, one pass per group, per-sample seeds, CFG, top-k/p, prefixes, exact SJD."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from arpipe.stages.models import (
    ModelConfig,
    Prompt,
    SamplingOptions,
    Transformer,
    VocabLayout,
    batch_inputs,
    generate,
    generate_sjd,
    make_plan,
    process_logits,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

VOCAB = VocabLayout.build({"image": 10, "volume": 6}, classes=range(4))
P = 2
PARADIGMS = {
    "next_token": (make_plan("next_token", grid=(3, 4), n_axes=3), 1, 12),
    "next_block": (make_plan("next_block", grid=(3, 4), block_size=4, n_axes=3), 4, 3),
    "next_scale": (make_plan("next_scale", scales=[1, 2, 3], n_axes=3), 1, 3),
}


def tiny_model(paradigm: str, block: int = 1, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=2, n_embd=32, rope_axes=3,
                         paradigm=paradigm, block_size=block, init_std=0.2)
    return Transformer(config).double().eval()


@pytest.mark.parametrize("paradigm", list(PARADIGMS))
def test_kv_cache_decodes_exactly_the_tokens_of_full_recompute(paradigm):
    plan, block, passes = PARADIGMS[paradigm]
    model = tiny_model(paradigm, block)
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1, 2, 3, None, 1])
    for opts in (dict(), dict(cfg_scale=2.5, cfg_schedule="linear", top_k=6, top_p=0.9, temperature=0.8)):
        cached = generate(model, plan, prompt, SamplingOptions(**opts), seed=7)
        full = generate(model, plan, prompt, SamplingOptions(use_cache=False, **opts), seed=7)
        assert torch.equal(cached.tokens, full.tokens)
        assert torch.allclose(cached.logprobs, full.logprobs, atol=1e-10)
        assert cached.forward_passes == full.forward_passes == passes
        lo, hi = VOCAB.code_range("image")
        assert ((cached.tokens >= lo) & (cached.tokens < hi)).all()
    other = generate(model, plan, prompt, seed=8)
    assert not torch.equal(other.tokens, generate(model, plan, prompt, seed=7).tokens)


def test_sjd_with_and_without_kv_cache_gives_the_same_tokens():
    plan, _, _ = PARADIGMS["next_token"]
    model = tiny_model("next_token")
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1, 2, None])
    for opts in (dict(), dict(cfg_scale=2.0, cfg_schedule="linear", top_p=0.8)):
        a = generate_sjd(model, plan, prompt, SamplingOptions(**opts), seed=3, window=5)
        b = generate_sjd(model, plan, prompt, SamplingOptions(use_cache=False, **opts), seed=3, window=5)
        assert torch.equal(a.tokens, b.tokens) and a.forward_passes == b.forward_passes
        assert a.forward_passes <= plan.n_tokens


@pytest.mark.parametrize("paradigm", list(PARADIGMS))
def test_sampling_uses_the_training_factorization(paradigm):
    """The log-probability each token was drawn with equals the training forward's on the finished sample."""
    plan, block, _ = PARADIGMS[paradigm]
    model = tiny_model(paradigm, block)
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 3, None])
    out = generate(model, plan, prompt, seed=1)
    batch = batch_inputs(plan, out.tokens, prompt.context_BP)
    logits, loss = model(**batch.as_kwargs())
    logp = torch.log_softmax(logits[:, P:].masked_fill(  # sampling was restricted to image codes
        ~_mask(VOCAB.code_range("image")), float("-inf")), -1)
    want = logp.gather(-1, out.tokens[..., None]).squeeze(-1)
    assert torch.allclose(out.logprobs, want, atol=1e-10)
    if paradigm == "next_token":
        sjd = generate_sjd(model, plan, prompt, seed=1, window=4)
        want = logp_of(model, plan, sjd.tokens, prompt.context_BP)
        assert torch.allclose(sjd.logprobs, want, atol=1e-10)


def _mask(code_range: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(VOCAB.vocab_size, dtype=torch.bool)
    m[code_range[0]:code_range[1]] = True
    return m


def logp_of(model, plan, tokens, context, uncond=None, scale=1.0):
    """Per-token log-probabilities of ``tokens`` under the (guided) model, restricted to image codes."""
    logits = model(**batch_inputs(plan, tokens, context).as_kwargs())[0][:, P:]
    if uncond is not None:
        u = model(**batch_inputs(plan, tokens, uncond).as_kwargs())[0][:, P:]
        logits = u + scale * (logits - u)
    logp = torch.log_softmax(logits.masked_fill(~_mask(VOCAB.code_range("image")), float("-inf")), -1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("method", ["plain", "sjd"])
def test_a_sample_reproduces_alone(method):
    """Sample 5 of a batch of 8 equals sample 5 drawn alone with the same seed."""
    plan, _, _ = PARADIGMS["next_token"]
    model = tiny_model("next_token")
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    decode = generate if method == "plain" else lambda *a, **k: generate_sjd(*a, window=4, **k)
    opts = SamplingOptions(cfg_scale=1.5, top_k=8)
    batch = decode(model, plan, Prompt.from_vocab(VOCAB, "image", labels), opts, seed=11)
    alone = decode(model, plan, Prompt.from_vocab(VOCAB, "image", labels[5:6]), opts, seed=11, sample_indices=[5])
    assert torch.equal(batch.tokens[5], alone.tokens[0])
    assert not torch.equal(batch.tokens[1], batch.tokens[5])  # same label, other sample: other tokens


def test_reproduction_alone_holds_for_block_and_scale_paradigms_too():
    for paradigm in ("next_block", "next_scale"):
        plan, block, _ = PARADIGMS[paradigm]
        model = tiny_model(paradigm, block)
        labels = [3, 2, 1, 0, 3, 2, 1, 0]
        batch = generate(model, plan, Prompt.from_vocab(VOCAB, "image", labels), seed=4)
        alone = generate(model, plan, Prompt.from_vocab(VOCAB, "image", [labels[5]]), seed=4, sample_indices=[5])
        assert torch.equal(batch.tokens[5], alone.tokens[0])


@pytest.mark.parametrize("paradigm", list(PARADIGMS))
def test_prefix_is_continued_not_regenerated(paradigm):
    plan, block, _ = PARADIGMS[paradigm]
    model = tiny_model(paradigm, block)
    m = plan.group_bounds[2]
    prefix = torch.randint(0, 10, (3, m))
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1, 2], prefix_local_BM=prefix)
    out = generate(model, plan, prompt, seed=2)
    assert torch.equal(VOCAB.to_local("image", out.tokens[:, :m]), prefix)
    assert out.forward_passes == plan.n_groups - 2
    assert torch.equal(out.tokens, generate(model, plan, prompt, SamplingOptions(use_cache=False), seed=2).tokens)
    if paradigm != "next_token":
        bad = Prompt.from_vocab(VOCAB, "image", [0], prefix_local_BM=torch.zeros(1, m + 1, dtype=torch.long))
        with pytest.raises(ValueError, match="ends inside a group"):
            generate(model, plan, bad)
    else:
        sjd = generate_sjd(model, plan, prompt, seed=2, window=3)
        assert torch.equal(sjd.tokens[:, :m], out.tokens[:, :m])


def test_sjd_rejects_parallel_paradigms():
    plan, block, _ = PARADIGMS["next_scale"]
    with pytest.raises(ValueError, match="applies to next_token plans"):
        generate_sjd(tiny_model("next_scale"), plan, Prompt.from_vocab(VOCAB, "image", [0]))


def test_top_k_top_p_and_temperature_shape_the_distribution():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.15, 0.1]]]))
    p = process_logits(logits, SamplingOptions(top_k=2))
    assert torch.allclose(p, torch.tensor([[[2 / 3, 1 / 3, 0, 0]]], dtype=torch.float64))
    p = process_logits(logits, SamplingOptions(top_p=0.8))  # smallest set with mass >= 0.8: 0.5 + 0.25 + 0.15
    assert torch.allclose(p, torch.tensor([[[0.5, 0.25, 0.15, 0]]], dtype=torch.float64) / 0.9)
    p = process_logits(logits, SamplingOptions(temperature=0))
    assert torch.equal(p, torch.tensor([[[1.0, 0, 0, 0]]], dtype=torch.float64))
    p = process_logits(logits, SamplingOptions(temperature=2.0), allowed=(1, 4))
    assert p[0, 0, 0] == 0 and torch.allclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert SamplingOptions(cfg_scale=3.0, cfg_schedule="linear").guidance(0, 4) == 1.0
    assert SamplingOptions(cfg_scale=3.0, cfg_schedule="linear").guidance(4, 4) == 3.0
    with pytest.raises(ValueError, match="top_p must lie in"):
        SamplingOptions(top_p=0.0)


def test_greedy_decoding_is_top_1_and_cfg_mixes_conditional_and_unconditional():
    plan, _, _ = PARADIGMS["next_token"]
    model = tiny_model("next_token")
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1])
    greedy = generate(model, plan, prompt, SamplingOptions(temperature=0), seed=1)
    assert torch.equal(greedy.tokens, generate(model, plan, prompt, SamplingOptions(top_k=1), seed=2).tokens)
    out = generate(model, plan, prompt, SamplingOptions(cfg_scale=3.0), seed=5)
    want = logp_of(model, plan, out.tokens, prompt.context_BP, prompt.uncond_BP, 3.0)
    assert torch.allclose(out.logprobs, want, atol=1e-10)


def _exact_and_observed(samples: torch.Tensor, log_joint: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    codes = samples[:, 0] * 9 + samples[:, 1] * 3 + samples[:, 2]
    observed = torch.bincount(codes, minlength=27).numpy()
    expected = log_joint.exp().numpy() * len(samples)
    keep = expected >= 5  # merge the rare outcomes into one cell
    return (np.append(observed[keep], observed[~keep].sum()), np.append(expected[keep], expected[~keep].sum()))


def test_sjd_samples_exactly_the_model_distribution():
    """On 3 tokens of 3 codes the model's joint (with CFG) is enumerable: SJD's empirical joint fits it."""
    vocab = VocabLayout.build({"x": 3}, classes=range(2))
    torch.manual_seed(3)
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=16, rope_axes=2,
                                    init_std=0.25)).double().eval()
    plan = make_plan("next_token", n_tokens=3, n_axes=2)
    all_seqs = torch.tensor(list(itertools.product(range(3), repeat=3))) + vocab.code_range("x")[0]
    ctx = torch.tensor([vocab.context("x", 1)] * 27)
    with torch.no_grad():
        cond = model(**batch_inputs(plan, all_seqs, ctx).as_kwargs())[0][:, P:]
        unc = model(**batch_inputs(plan, all_seqs, vocab.unconditional(ctx)).as_kwargs())[0][:, P:]
    lo, hi = vocab.code_range("x")
    guided = (unc + 1.5 * (cond - unc))[..., lo:hi]
    log_joint = torch.log_softmax(guided, -1).gather(-1, (all_seqs - lo)[..., None]).squeeze(-1).sum(1)
    assert torch.allclose(log_joint.exp().sum(), torch.tensor(1.0, dtype=torch.float64))

    prompt = Prompt.from_vocab(vocab, "x", [1] * 3000)
    opts = SamplingOptions(cfg_scale=1.5)
    sjd = generate_sjd(model, plan, prompt, opts, seed=0, window=3)
    plain = generate(model, plan, prompt, opts, seed=1)
    for out in (sjd, plain):
        observed, expected = _exact_and_observed(vocab.to_local("x", out.tokens), log_joint)
        assert chisquare(observed, expected).pvalue > 0.01
    assert sjd.sample_passes.float().mean() < 3  # some drafts were accepted


def test_plans_follow_the_tokenizers_layouts():
    """An msvq image tokenizer's scales and a volume patch grid become plans whose groups match its tokens."""
    from arpipe.stages.modalities import MultiScaleVQ, PatchVQ
    from arpipe.stages.models import plan_for, plan_from_layout

    msvq = MultiScaleVQ(input_shape=(1, 16, 16), patch=(2, 2), scales=[1, 2, 4, 8], codebook_size=16)
    plan = plan_from_layout("next_scale", msvq.layout(), n_axes=4)
    assert plan.group_bounds == msvq.boundaries and plan.n_tokens == msvq.tokens_per_sample
    # each scale's cells keep the tokenizer's level and row-major order (centres in the finest grid)
    levels = msvq.positions()[:, 0].float()
    assert torch.equal(plan.coords_NA[:, 0], levels)
    assert torch.equal(plan.source_N[1:5], torch.zeros(4, dtype=torch.long))  # scale 2 reads scale 1's token
    volume = PatchVQ(input_shape=(1, 8, 8, 8), patch=(2, 2, 2), codebook_size=16, modality="volume")
    config = ModelConfig(vocab_size=64, paradigm="next_block", block_size=16)
    plan = plan_for(config, grid=volume.layout()["grid"])
    assert plan.n_tokens == 64 and plan.group_sizes == (16,) * 4 and plan.coords_NA.shape == (64, 4)
    with pytest.raises(ValueError, match="raise rope_axes to 4"):
        plan_from_layout("next_token", volume.layout(), n_axes=3)
    with pytest.raises(ValueError, match="next_scale needs scales"):
        plan_from_layout("next_scale", volume.layout())


def test_sampling_refuses_a_plan_of_another_paradigm():
    plan, _, _ = PARADIGMS["next_scale"]
    with pytest.raises(ValueError, match="trained as next_token .* plan is next_scale"):
        generate(tiny_model("next_token"), plan, Prompt.from_vocab(VOCAB, "image", [0]))
