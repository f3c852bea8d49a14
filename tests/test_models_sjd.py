"""Speculative Jacobi decoding on a model trained in the test (sklearn digits, 4 grey levels, 8x8 raster):
its samples follow plain sampling's distribution, in fewer forward passes; LANTERN's relaxed acceptance,
with grey levels as the codebook, accepts longer runs still."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from realdata import fit_digits
from scipy.stats import chi2_contingency
from sklearn.datasets import load_digits

from arpipe.stages.models import (
    ModelConfig,
    Prompt,
    Relaxation,
    Transformer,
    VocabLayout,
    generate,
    generate_sjd,
    make_plan,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LEVELS = 4


def train_digits_model(steps: int = 150) -> tuple[Transformer, VocabLayout]:
    digits = load_digits()
    codes = torch.from_numpy(np.minimum(digits.images * LEVELS / 17, LEVELS - 1).astype(np.int64)).reshape(-1, 64)
    vocab = VocabLayout.build({"image": LEVELS}, classes=range(10))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=4, n_embd=64, rope_axes=3))
    plan = make_plan("next_token", grid=(8, 8), n_axes=3)
    context = torch.tensor([vocab.context("image", int(y)) for y in digits.target])
    targets = vocab.to_global("image", codes)
    losses = fit_digits(model, plan, targets, context, vocab, steps)
    assert np.mean(losses[-20:]) < 0.8 < losses[0], "the model did not learn the digits"
    return model.eval(), vocab


@pytest.fixture(scope="module")
def digits_model(single_torch_thread) -> tuple[Transformer, VocabLayout]:
    return train_digits_model()


def counts(tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Histograms a wrong sampler would distort: single tokens and raster-adjacent pairs."""
    pairs = tokens[:, :-1] * LEVELS + tokens[:, 1:]
    return {"tokens": torch.bincount(tokens.reshape(-1), minlength=LEVELS).numpy(),
            "pairs": torch.bincount(pairs.reshape(-1), minlength=LEVELS ** 2).numpy()}


def test_sjd_matches_plain_sampling_with_fewer_forward_passes(digits_model, record_property):
    model, vocab = digits_model
    plan = make_plan("next_token", grid=(8, 8), n_axes=3)
    prompt = Prompt.from_vocab(vocab, "image", [i % 10 for i in range(48)])  # 3072 tokens per method
    plain = generate(model, plan, prompt, seed=1)
    sjd = generate_sjd(model, plan, prompt, seed=2, window=16)

    a, b = counts(vocab.to_local("image", plain.tokens)), counts(vocab.to_local("image", sjd.tokens))
    for name in a:
        table = np.stack([a[name], b[name]])
        table = table[:, table.sum(0) >= 10]
        p = chi2_contingency(table).pvalue
        assert p > 0.01, f"SJD's {name} histogram differs from plain sampling's (p = {p:.4f})"

    per_sample = sjd.sample_passes.double().mean().item() / plan.n_tokens
    batch = sjd.forward_passes / plain.forward_passes
    record_property("sjd_passes_per_sample_ratio", round(per_sample, 3))
    record_property("sjd_batch_passes_ratio", round(batch, 3))
    print(f"SJD forward passes / plain: {per_sample:.2f} per sample, {batch:.2f} for the batch of 48")
    assert plain.forward_passes == plan.n_tokens
    assert per_sample < 0.67 and sjd.forward_passes < plain.forward_passes


def test_lantern_accepts_longer_runs_than_sjd(digits_model, record_property):
    """Grey levels on a line are the codebook: a draft one level off a likely level is accepted more often."""
    model, vocab = digits_model
    plan = make_plan("next_token", grid=(8, 8), n_axes=3)
    prompt = Prompt.from_vocab(vocab, "image", [i % 10 for i in range(48)])
    levels_KD = torch.arange(LEVELS, dtype=torch.float32)[:, None]
    lantern = Relaxation.from_codebook(levels_KD, k=2, delta=0.3, start=vocab.code_range("image")[0],
                                       vocab_size=vocab.vocab_size)
    sjd = generate_sjd(model, plan, prompt, seed=2, window=16)
    relaxed = generate_sjd(model, plan, prompt, seed=2, window=16, relaxation=lantern)
    per_pass = {name: plan.n_tokens / out.sample_passes.double().mean().item()
                for name, out in (("sjd", sjd), ("lantern", relaxed))}
    record_property("lantern_vs_sjd_tokens_per_pass", round(per_pass["lantern"] / per_pass["sjd"], 3))
    print(f"accepted tokens per forward: SJD {per_pass['sjd']:.2f}, LANTERN k=2 delta=0.3 {per_pass['lantern']:.2f}")
    assert per_pass["lantern"] > per_pass["sjd"]
