"""VAR's next-scale input: a scale is fed the accumulated reconstruction of the coarser scales, as VAR does it.

A user training ``paradigm: next_scale`` on an msvq store gets this input by default; these tests check it
against the paper's definition (VAR's ``idxBl_to_var_input``), that it never leaks a scale's own tokens, and
that cached sampling, saving and loading keep it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arpipe.stages.modalities import make_tokenizer
from arpipe.stages.models import (
    ModelConfig,
    Prompt,
    SamplingOptions,
    ScaleInput,
    Transformer,
    VocabLayout,
    batch_inputs,
    generate,
    load_model,
    load_scale_inputs,
    make_plan,
    save_model,
)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.nn.functional.interpolate(torch.from_numpy(d.images[:300, None] / 16).float(), size=16,
                                        mode="bilinear")
    tok = make_tokenizer("msvq", input_shape=[1, 16, 16], patch=[2, 2], scales=[1, 2, 4, 8],
                         codebook_size=32, fit_iters=20).fit(x)
    return tok, x, [str(t) for t in d.target[:300]]


def test_the_input_of_each_scale_is_the_downsampled_reconstruction_of_the_coarser_ones(digits):
    tok, x, _labels = digits
    idx_BN = tok.encode(x[:6])
    ours_BND = ScaleInput(tok.codebook_KD, tok.next_scale_input_mix(), code_start=0).features(idx_BN)
    # VAR's idxBl_to_var_input, written out: accumulate upsampled codes, area-downsample to the next scale
    f_hat = torch.zeros(6, int(np.prod(tok.grid)), tok.dim)
    expected, bounds = [], tok.boundaries
    for k, scale in enumerate(tok.scales):
        expected.append(torch.nn.functional.adaptive_avg_pool2d(
            f_hat.transpose(1, 2).reshape(6, tok.dim, *tok.grid), scale).flatten(2).transpose(1, 2))
        codes = tok.codebook_KD[idx_BN[:, bounds[k]:bounds[k + 1]]]
        f_hat = f_hat + torch.nn.functional.interpolate(
            codes.transpose(1, 2).reshape(6, tok.dim, *scale), size=tok.grid, mode="bicubic",
            align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours_BND, torch.cat(expected, dim=1), atol=1e-5, rtol=1e-5)
    assert ours_BND[:, 0].abs().max() == 0   # scale 1 is fed the start token, not features
    # the last input plus the last scale's codes is the tokenizer's full reconstruction
    assert tok.decode(idx_BN).shape == x[:6].shape


def test_a_scale_never_sees_its_own_or_finer_tokens(digits):
    tok, x, _labels = digits
    si = ScaleInput(tok.codebook_KD, tok.next_scale_input_mix(), code_start=0)
    idx_BN = tok.encode(x[:2])
    bounds = tok.boundaries
    for k in range(len(tok.scales)):
        changed = idx_BN.clone()
        changed[:, bounds[k]:] = (changed[:, bounds[k]:] + 7) % tok.codebook_size
        same = si.features(changed)[:, :bounds[k + 1]]
        assert torch.equal(same, si.features(idx_BN)[:, :bounds[k + 1]]), k
        if k + 1 < len(tok.scales):   # ...while every finer scale reads it
            assert not torch.equal(si.features(changed)[:, bounds[k + 1]:], si.features(idx_BN)[:, bounds[k + 1]:])


def _model(tok, vocab, scale_input: ScaleInput | None) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=2, n_embd=32, rope_axes=3,
                                   paradigm="next_scale", max_seq_len=90,
                                   feature_dim=scale_input.feature_dim if scale_input else 0)).eval()


def test_sampling_with_the_cache_equals_sampling_without_and_the_saved_model_samples_the_same(digits, tmp_path):
    tok, _x, _labels = digits
    vocab = VocabLayout.build({"image": tok.codebook_size}, classes=range(10))
    si = ScaleInput(tok.codebook_KD, tok.next_scale_input_mix(), vocab.code_range("image")[0])
    model = _model(tok, vocab, si)
    plan = make_plan("next_scale", scales=tok.scales, n_axes=3).with_scale_input(si)
    prompt = Prompt.from_vocab(vocab, "image", ["3", "7", None])
    opts = dict(cfg_scale=2.0, cfg_schedule="linear", top_k=8)
    cached = generate(model, plan, prompt, SamplingOptions(**opts), seed=5)
    plain = generate(model, plan, prompt, SamplingOptions(use_cache=False, **opts), seed=5)
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.forward_passes == len(tok.scales)

    folder = save_model(tmp_path / "m", model, vocab=vocab, scale_inputs={"image": si})
    again = load_model(folder)
    loaded = load_scale_inputs(folder)["image"]
    replayed = generate(again, plan.with_scale_input(loaded), prompt, SamplingOptions(**opts), seed=5)
    assert torch.equal(replayed.tokens, cached.tokens)
    with pytest.raises(ValueError, match="feature_dim"):   # a plan without the input is refused, not garbage
        generate(again, make_plan("next_scale", scales=tok.scales, n_axes=3), prompt)


def test_the_training_loss_depends_on_the_coarser_scales_through_the_features(digits):
    """The model reads the features: changing a coarse code changes the finer scales' logits."""
    tok, x, labels = digits
    vocab = VocabLayout.build({"image": tok.codebook_size}, classes=range(10))
    si = ScaleInput(tok.codebook_KD, tok.next_scale_input_mix(), vocab.code_range("image")[0])
    model = _model(tok, vocab, si)
    plan = make_plan("next_scale", scales=tok.scales, n_axes=3).with_scale_input(si)
    targets = vocab.to_global("image", tok.encode(x[:4]))
    context = torch.tensor([vocab.context("image", y) for y in labels[:4]])
    batch = batch_inputs(plan, targets, context)
    assert batch.features.shape == (4, 2 + plan.n_tokens, tok.dim)
    logits, loss = model(**batch.as_kwargs())
    assert torch.isfinite(loss)
    changed = targets.clone()
    changed[:, 1:5] = vocab.code_range("image")[0] + (changed[:, 1:5] - vocab.code_range("image")[0] + 3) % 32
    other, _ = model(**batch_inputs(plan, changed, context).as_kwargs())
    assert torch.equal(other[:, :2 + 5], logits[:, :2 + 5])           # context and scales 1-2 unchanged
    assert not torch.allclose(other[:, 2 + 5:], logits[:, 2 + 5:])   # scales 3-4 read the changed codes
