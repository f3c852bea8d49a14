"""FlexVAR's scales: one next-scale model trained on 16x16 and 32x32 digits draws digits at both, and at 24x24.

A ``flexvq`` tokenizer writes every scale as the image itself at that scale's resolution (the image resized
to ``scale x patch`` pixels, cut into patches, matched to one codebook), never a residual. So a 16x16
digit's tokens are the first 4 scales of the 6 a 32x32 digit has, one store holds both, a model learns
scale 6 (24x24 pixels) on its way to 32x32, and sampling that stops there draws a size no training image
had. A judge fitted on the real digits must recognise the requested digit in >= 70% of the samples at
each size; noise, shuffled labels and an untrained model stay near chance. A user tokenizes a folder of
mixed sizes through the pipeline, and a size the tokenizer does not take is one line.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BACKGROUND_NICE, BUILD_TIMEOUT_S, arpipe, background_script, stage_lines

from arpipe.stages.modalities import TokenizerError, make_tokenizer
from arpipe.stages.models import (
    ModelConfig,
    Prompt,
    SamplingOptions,
    ScaleInput,
    Transformer,
    VocabLayout,
    batch_inputs,
    generate,
    make_plan,
)

SCALES = [1, 2, 3, 4, 6, 8]
SIZES = (16, 24, 32)
TRAINED_SIZES = (16, 32)
STEPS = 600
# measured at 600 steps (one 2-layer model, batches of one size, alternating): 0.90 at 16x16, 0.82 at 24x24
# (never a training image), 0.84 at 32x32; noise 0.08-0.11 (chance 0.10). The issue asks for 0.7.
CAS_FLOOR = 0.7
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def digits_at(sides=SIZES) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """scikit-learn's 1797 digits upsampled (bilinear) to each side, in [0, 1]; their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x8 = torch.from_numpy(d.images[:, None].astype(np.float32) / 16)
    return ({n: F.interpolate(x8, size=(n, n), mode="bilinear", align_corners=False).clamp(0, 1).numpy()
             for n in sides}, d.target)


def tokenizer(x: dict[int, np.ndarray]):
    """A flexvq tokenizer taking 16, 24 and 32, fitted on 750 16x16 and 750 other 32x32 digits."""
    tok = make_tokenizer("flexvq", patch=[4, 4], scales=SCALES, sizes=list(SIZES), channels=1, codebook_size=256,
                         fit_iters=60)
    return tok.fit(list(x[16][:750]) + list(x[32][750:1500]))


def judged(images: np.ndarray) -> np.ndarray:
    """The judge's features: an image of any size resized to 16x16, flattened."""
    t = torch.from_numpy(np.asarray(images, dtype=np.float32)).clamp(0, 1)
    return F.interpolate(t, size=(16, 16), mode="bilinear", antialias=True, align_corners=False).reshape(
        len(t), -1).numpy()


def fit_judge(x: dict[int, np.ndarray], labels: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000).fit(judged(x[16][:1500]), labels[:1500])


def cas(judge, images: np.ndarray, requested: np.ndarray) -> float:
    return float(np.mean(judge.predict(judged(images)) == requested))


@pytest.fixture(scope="module")
def digits():
    x, labels = digits_at()
    return x, labels, tokenizer(x), fit_judge(x, labels)


# ---------------------------------------------------------------- the tokenizer


def test_each_size_is_the_scales_up_to_its_grid_and_decodes_from_its_last_scale(digits):
    x, labels, tok, judge = digits
    lengths = {n: len(t) for n, t in zip(SIZES, tok.encode_arrays([x[n][0] for n in SIZES]))}
    assert lengths == {16: 1 + 4 + 9 + 16, 24: 30 + 36, 32: 66 + 64}
    assert tok.layout()["lengths"] == [30, 66, 130] and tok.layout()["sizes"] == [[16, 16], [24, 24], [32, 32]]
    # the coarser scales are the image at those resolutions, whatever its size: a 16x16 digit's tokens are
    # (nearly all: resizing 16 -> 4 and 32 -> 4 pixels rounds apart) the first scales of its 32x32 tokens
    t16 = np.stack(tok.encode_arrays(list(x[16][:200])))
    t32 = np.stack(tok.encode_arrays(list(x[32][:200])))
    assert np.mean(t16 == t32[:, :30]) > 0.85
    assert np.mean(t16[:, :14] == t32[:, :14]) > np.mean(t16[:, 14:] == t32[:, 14:30]) - 0.1
    # decoding reads only the last scale: other coarse tokens decode to the same image
    changed = t16.copy()
    changed[:, :14] = (changed[:, :14] + 7) % tok.codebook_size
    assert np.array_equal(np.stack(tok.decode_arrays(list(changed))), np.stack(tok.decode_arrays(list(t16))))
    # and it is the digit: the judge recognises the round trip at every size, mixed sizes in one call
    for n in SIZES:
        back = tok.decode_arrays(tok.encode_arrays(list(x[n][:200])))
        assert back[0].shape == (1, n, n)
        assert cas(judge, np.stack(back), labels[:200]) >= 0.9, n
    mixed = tok.decode_arrays(tok.encode_arrays([x[32][5], x[16][6], x[24][7]]))
    assert [m.shape[-1] for m in mixed] == [32, 16, 24]


def test_the_next_scale_input_reads_the_scale_before_interpolated_and_a_smaller_size_keeps_the_leading_block(digits):
    tok = digits[2]
    mix = tok.next_scale_input_mix()
    bounds = tok.boundaries
    assert mix.shape == (130, 130)
    assert torch.count_nonzero(mix[:1]) == 0   # scale 1 reads the start token
    for k in range(1, len(SCALES)):
        rows = mix[bounds[k]:bounds[k + 1]]
        assert torch.allclose(rows.sum(1), torch.ones(bounds[k + 1] - bounds[k]))   # an interpolation
        assert torch.count_nonzero(rows[:, :bounds[k - 1]]) == 0 and torch.count_nonzero(rows[:, bounds[k]:]) == 0
    # scale 4 (4x4) read from scale 3 (3x3): bilinear interpolation of a 3x3 map at 4x4, as F.interpolate does
    codes = torch.randn(1, 1, 3, 3)
    expected = F.interpolate(codes, size=(4, 4), mode="bilinear", align_corners=False).reshape(-1)
    assert torch.allclose(mix[bounds[3]:bounds[4], bounds[2]:bounds[3]] @ codes.reshape(-1), expected, atol=1e-6)
    vocab = VocabLayout.build({"image": tok.codebook_size}, classes=range(10))
    plan = make_plan("next_scale", scales=SCALES, n_axes=3).with_scale_input(
        ScaleInput(tok.codebook_KD, mix, vocab.code_range("image")[0]))
    small = plan.prefix(30)
    assert small.group_sizes == (1, 4, 9, 16) and small.n_tokens == 30
    assert torch.equal(small.coords_NA, plan.coords_NA[:30]) and torch.equal(small.source_N, plan.source_N[:30])
    assert torch.equal(small.scale_input.mix_NN, mix[:30, :30])
    with pytest.raises(ValueError, match="end inside a scale"):
        plan.prefix(31)


def test_a_size_the_tokenizer_does_not_take_is_one_line(digits):
    x, _labels, tok, _judge = digits
    twenty = F.interpolate(torch.from_numpy(x[16][:1]), size=(20, 20), mode="bilinear").numpy()
    with pytest.raises(TokenizerError) as err:
        tok.encode_arrays([x[16][0], twenty[0]])
    assert "\n" not in str(err.value)
    assert "16x16, 24x24, 32x32" in str(err.value) and "1x20x20" in str(err.value)
    with pytest.raises(TokenizerError, match="5x5 token grid, which is not one of the scales"):
        make_tokenizer("flexvq", patch=[4, 4], scales=SCALES, sizes=[16, 20], channels=1)
    with pytest.raises(TokenizerError, match="decodes whole scales"):
        tok.decode_arrays([np.zeros(31, dtype=np.int64)])
    for bad in ([16, 16, 1], [16], "16"):
        with pytest.raises(TokenizerError, match="a side or \\[h, w\\]"):
            make_tokenizer("flexvq", patch=[4, 4], scales=SCALES, sizes=[bad], channels=1)


# ---------------------------------------------------------------- a model at three sizes


def train_and_sample(x, labels, tok, *, steps: int = STEPS) -> dict[int, np.ndarray]:
    """A 2-layer next_scale model trained on 16x16 and 32x32 digits (batches of one size, alternating: grouped
    by length), with FlexVAR's input; 100 samples drawn at each of 16, 24 and 32 (10 per class)."""
    from realdata import fit_digits

    vocab = VocabLayout.build({"image": tok.codebook_size}, classes=range(10))
    si = ScaleInput(tok.codebook_KD, tok.next_scale_input_mix(), vocab.code_range("image")[0])
    full = make_plan("next_scale", scales=SCALES, n_axes=3).with_scale_input(si)
    plans = {n: full.prefix(tok.length_of((n, n))) for n in SIZES}
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=4, n_embd=64, rope_axes=3,
                                    paradigm="next_scale", max_seq_len=2 + full.n_tokens, feature_dim=si.feature_dim))
    context = torch.tensor([vocab.context("image", str(c)) for c in labels[:1500]])
    codes = {n: vocab.to_global("image", torch.from_numpy(np.stack(tok.encode_arrays(list(x[n][:1500])))))
             for n in TRAINED_SIZES}
    for _ in range(steps // 100):   # 100 steps of each size in turn
        for n in TRAINED_SIZES:
            fit_digits(model, plans[n], codes[n], context, vocab, 50)
    requested = np.arange(100) % 10
    drawn = {}
    for n in SIZES:
        out = generate(model.eval(), plans[n], Prompt.from_vocab(vocab, "image", [str(c) for c in requested]),
                       SamplingOptions(cfg_scale=2.0, cfg_schedule="linear"), seed=0)
        drawn[n] = np.stack(tok.decode_arrays(list(vocab.to_local("image", out.tokens).numpy())))
    return drawn


def build_samples(folder: Path, _ray_address: str) -> dict[int, np.ndarray]:
    saved = np.load(background_script(__file__, folder / "samples.npz", "training the flexible-scale model"))
    return {n: saved[str(n)] for n in SIZES}


TINY = [a for o in ("stages.data.config.heldout=40", "stages.tokenizer.fit.max_samples=400",
                     "stages.tokenizer.tokenizer.codebook_size=64", "stages.tokenizer.tokenizer.fit_iters=10",
                     "stages.train.steps=4", "stages.train.checkpoint_every=4", "stages.train.eval_every=4",
                     "stages.train.global_batch=8", "stages.sample_24.num_samples=20") for a in ("-s", o)]


def build_example(root: Path, ray_address: str) -> Path:
    """examples/flexible_digits.yaml with tiny budgets through sampling at 24x24 and its scoring."""
    for name in ("flexible_digits.yaml", "flexible_digits_steps.py", "digits_steps.py"):
        shutil.copy(EXAMPLES / name, root / name)
    run = arpipe("run", "flexible_digits.yaml", *TINY, "--until", "evaluate_24",
                 cwd=root, env={"RAY_ADDRESS": ray_address}, timeout=BUILD_TIMEOUT_S, check=True,
                 nice=BACKGROUND_NICE)
    states = {stage: seen[-1] for stage, seen in stage_lines(run.stdout).items()}
    assert set(states.values()) == {"done"}, run.stdout
    return root


BUILT_IN_BACKGROUND = {"flexible-samples": build_samples, "flexible-example": build_example}


@pytest.fixture(scope="module")
def samples(background):
    return background.result("flexible-samples")


@pytest.mark.parametrize("size", SIZES)
def test_the_judge_recognises_the_requested_digit_at_each_size(samples, digits, size):
    """16 and 32 were trained on; 24 never was (its scale was only a step towards 32)."""
    requested = np.arange(100) % 10
    assert samples[size].shape == (100, 1, size, size)
    score = cas(digits[3], samples[size], requested)
    assert score >= CAS_FLOOR, f"{size}x{size}: CAS {score:.2f}"


def test_noise_shuffled_labels_and_an_untrained_model_stay_near_chance(samples, digits, single_torch_thread):
    x, labels, tok, judge = digits
    requested = np.arange(100) % 10
    rng = np.random.default_rng(0)
    for n in SIZES:
        assert cas(judge, rng.random(samples[n].shape, dtype=np.float32), requested) < CAS_FLOOR / 2
        assert cas(judge, samples[n], rng.permutation(requested)) < CAS_FLOOR / 2
    untrained = train_and_sample(x, labels, tok, steps=0)
    assert all(cas(judge, untrained[n], requested) < CAS_FLOOR / 2 for n in SIZES)


# ---------------------------------------------------------------- through the pipeline


@pytest.fixture(scope="module")
def example(background):
    return background.result("flexible-example")


def test_one_store_holds_both_sizes_and_the_model_samples_a_size_it_never_saw(example):
    from PIL import Image

    from arpipe.stages.store import TokenStore

    [store] = [TokenStore.open(str(p)) for p in example.glob("arpipe-runs/digits/*/store")]
    assert sorted(set(store.lengths().tolist())) == [30, 130]
    pictures = sorted(example.glob("arpipe-runs/sample_24/*/media/image/*.png"))
    assert len(pictures) == 20 and {Image.open(p).size for p in pictures} == {(24, 24)}
    [sheet] = example.glob("arpipe-runs/sample_24/*/media/contact_image.png")
    assert Image.open(sheet).size[0] > 24   # the samples side by side
    [metrics] = example.glob("arpipe-runs/evaluate_24/*/metrics/metrics.json")
    assert "image/cas" in metrics.read_text()


def test_the_trainer_lays_each_size_out_as_the_first_scales_of_the_full_plan(example):
    """Documents of 30 and 130 tokens from the example's store, as the train stage builds its rows: each one
    is the full next-scale plan cut to its scales (positions, inputs, FlexVAR's input features), as laid out
    alone by ``batch_inputs``; and the model's sequence length fits the tokenizer's largest size."""
    from arpipe.stages.store import TokenStore
    from arpipe.stages.train.data import (
        Documents,
        build_vocab,
        default_seq_len,
        scale_inputs,
        summarize_store,
    )

    [uri] = [str(p) for p in example.glob("arpipe-runs/digits/*/store")]
    store, summaries = TokenStore.open(uri), [summarize_store(uri)]
    vocab, names = build_vocab(summaries)
    inputs = scale_inputs(summaries, names, vocab)
    assert default_seq_len(summaries, vocab) == vocab.context_len + 130
    docs = Documents(store, summaries, names, vocab, paradigm="next_scale", block_size=1, n_axes=3,
                     seq_len=vocab.context_len + 130, scale_inputs=inputs)
    full = make_plan("next_scale", scales=SCALES, n_axes=3).with_scale_input(inputs["image"])
    lengths = store.lengths()
    for i in (int(np.flatnonzero(lengths == 30)[0]), int(np.flatnonzero(lengths == 130)[0])):
        plan, targets, context = docs.document(i)
        alone = batch_inputs(full.prefix(len(targets)), targets[None], context[None])
        row = docs.rows([i])
        width = alone.input_ids.shape[1]
        assert plan.n_tokens == lengths[i] and width == vocab.context_len + lengths[i]
        for name in ("input_ids", "target_ids", "coords", "group_ids", "features", "feature_mask"):
            assert torch.equal(getattr(row, name)[:, :width], getattr(alone, name)), name
    # a wrong layout would not match: the 16x16 digit laid out as the 130-token plan's last 30 positions
    assert not torch.equal(full.coords_NA[100:], full.prefix(30).coords_NA)


def test_the_first_scales_of_a_stored_digit_continue_to_a_larger_size(example, ray_cluster):
    """``prefix`` with ``size``: the first 4 scales (30 tokens: a whole 16x16 digit, or a 32x32 one's coarse
    scales) of the store's digits, continued by the model to 24x24. Each sample starts with its digit's 30
    tokens and is a 24x24 picture."""
    from PIL import Image

    from arpipe.stages.store import TokenStore

    stage = ('stages.continued={kind: sample, model: "${train.model}", size: 24, '
             'prefix: {store: "${digits.store}", tokens: 30, samples: 6}}')
    run = arpipe("run", "flexible_digits.yaml", *TINY, "-s", stage, "--until", "continued", cwd=example,
                 env={"RAY_ADDRESS": ray_cluster}, timeout=BUILD_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    [drawn] = [TokenStore.open(str(p)) for p in example.glob("arpipe-runs/continued/*/samples")]
    [store] = [TokenStore.open(str(p)) for p in example.glob("arpipe-runs/digits/*/store")]
    assert len(drawn) == 6 and set(drawn.lengths().tolist()) == {66}
    for i in range(6):
        assert np.array_equal(drawn.tokens(i)[:30], store.tokens(i)[:30]), i
    pictures = sorted(example.glob("arpipe-runs/continued/*/media/image/*.png"))
    assert len(pictures) == 6 and {Image.open(p).size for p in pictures} == {(24, 24)}


@pytest.mark.parametrize("override, says", [
    ("stages.sample_24.size=20", ["size 20x20", "16x16, 24x24, 32x32"]),
    ('stages.sample_24.inpaint={store: "${digits.store}", box: [0, 0, 12, 24]}', ["is not 24x24", "in-paint"]),
], ids=["size outside the set", "in-painting a store of other sizes"])
def test_a_sample_stage_asking_for_a_size_the_model_cannot_draw_is_one_line(example, ray_cluster, override, says):
    """The model is trained (the stages before are cached); the sample stage fails in one line, exit 2."""
    run = arpipe("run", "flexible_digits.yaml", *TINY, "-s", override, "--until", "sample_24",
                 cwd=example, env={"RAY_ADDRESS": ray_cluster}, timeout=BUILD_TIMEOUT_S)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if all(s in line for s in says)]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr


if __name__ == "__main__":   # the background build: python test_flexible_scales.py OUT.npz
    torch.set_num_threads(1)
    x, labels = digits_at()
    drawn = train_and_sample(x, labels, tokenizer(x))
    np.savez(sys.argv[1], **{str(n): images for n, images in drawn.items()})
