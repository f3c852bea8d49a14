"""A user fits patch_vq, msvq and vqvae on real pictures, compares their reconstructions and ships artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.transform import resize
from sklearn.datasets import load_digits

from arpipe.pipeline.storage import storage_for
from arpipe.stages.modalities import (
    VQVAE,
    ImageReader,
    MultiScaleVQ,
    PatchVQ,
    TokenizerError,
    codebook_usage,
    load_tokenizer,
    make_tokenizer,
    psnr,
    ssim,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Torch on one thread: these tensors are small, and two threads crawl when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiles(img: np.ndarray, side: int = 128, tile: int = 32) -> np.ndarray:
    small = resize(img, (side, side), anti_aliasing=True).astype(np.float32)
    return np.stack([small[y:y + tile, x:x + tile].transpose(2, 0, 1)
                     for y in range(0, side, tile) for x in range(0, side, tile)])


@pytest.fixture(scope="module")
def photos() -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 RGB tiles: astronaut + coffee to fit on, chelsea (the cat) to test on."""
    train = np.concatenate([_tiles(skdata.astronaut()), _tiles(skdata.coffee())])
    return torch.from_numpy(train), torch.from_numpy(_tiles(skdata.chelsea()))


@pytest.fixture(scope="module")
def faces() -> tuple[torch.Tensor, torch.Tensor]:
    """lfw_subset at 32x32 gray, shuffled once, 150 to fit and 50 held out."""
    lfw = skdata.lfw_subset()
    x = np.stack([resize(a, (32, 32), anti_aliasing=True) for a in lfw]).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    return torch.from_numpy(x[order[:150]]), torch.from_numpy(x[order[150:]])


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy((load_digits().images / 16.0).astype(np.float32))[:, None]
    return x[:1500], x[1500:]


def quality(tok, x: torch.Tensor) -> float:
    return float(psnr(tok.decode(tok.encode(x)), x).mean())


def test_patch_vq_psnr_rises_with_codebook_size(photos, faces):
    report = {}
    for name, (train, test) in {"photos": photos, "faces": faces}.items():
        shape = tuple(train.shape[1:])
        report[name] = [quality(PatchVQ(input_shape=shape, patch=(4, 4), codebook_size=k, fit_iters=30).fit(train), test)
                        for k in (8, 32, 128)]
    print("\npatch_vq held-out PSNR (dB) at K = 8, 32, 128:",
          {k: [round(v, 2) for v in vs] for k, vs in report.items()})
    for values in report.values():
        assert values[0] < values[1] < values[2]


def test_msvq_psnr_rises_with_scales_and_codebook_size(photos, faces):
    train, test = faces
    by_scales = {}
    for scales in ([1, 2], [1, 2, 4], [1, 2, 4, 8]):
        tok = MultiScaleVQ(input_shape=(1, 32, 32), patch=(4, 4), scales=scales, codebook_size=64, fit_iters=30).fit(train)
        by_scales[tok.tokens_per_sample] = quality(tok, test)
    by_k = {}
    for k in (8, 32, 128):
        tok = MultiScaleVQ(input_shape=(3, 32, 32), patch=(4, 4), scales=[1, 2, 4, 8], codebook_size=k,
                           fit_iters=30).fit(photos[0])
        by_k[k] = quality(tok, photos[1])
    print("\nmsvq held-out PSNR (dB) by token count (faces):", {k: round(v, 2) for k, v in by_scales.items()},
          "by codebook size (photos):", {k: round(v, 2) for k, v in by_k.items()})
    assert list(by_scales) == [5, 21, 85]
    assert by_scales[5] < by_scales[21] < by_scales[85]
    assert by_k[8] < by_k[32] < by_k[128]
    # the coarse-to-fine token order: each scale decoded adds detail
    idx = tok.encode(photos[1])
    partial = [float(psnr(tok.decode(idx, upto=k), photos[1]).mean()) for k in (1, 2, 3, 4)]
    assert partial == sorted(partial)


def test_vqvae_trained_briefly_beats_patch_vq_at_the_same_token_count(digits):
    train, test = digits
    baseline = PatchVQ(input_shape=(1, 8, 8), patch=(2, 2), codebook_size=16).fit(train)
    learned = VQVAE(input_shape=(1, 8, 8), downsample=2, codebook_size=16, hidden=32, code_dim=8, device="auto")
    learned.fit(train, steps=400, batch_size=64)
    assert learned.tokens_per_sample == baseline.tokens_per_sample == 16
    p_base, p_learned = quality(baseline, test), quality(learned, test)
    s_base = float(ssim(baseline.decode(baseline.encode(test)), test).mean())
    s_learned = float(ssim(learned.decode(learned.encode(test)), test).mean())
    usage = codebook_usage(learned.encode(test), learned.vocab_size)
    print(f"\ndigits, 16 tokens of 16 codes: patch_vq PSNR {p_base:.2f} dB SSIM {s_base:.3f}; "
          f"vqvae ({learned.fit_info['steps']} steps, {learned.provenance['seconds']} s) PSNR {p_learned:.2f} dB "
          f"SSIM {s_learned:.3f}; codes used {usage['used']:.2f}, perplexity {usage['perplexity']:.1f}")
    assert p_learned > p_base + 1.0
    assert usage["used"] > 0.5  # dead-code restarts keep the codebook in use
    assert learned.fit_info["curve"][-1]["recon"] < learned.fit_info["curve"][0]["recon"]


def test_reader_samples_go_through_the_stage_entry_points(tmp_path, digits):
    np.save(tmp_path / "digits.npy", (load_digits().images[:40] * 16).astype(np.uint8))
    samples = list(ImageReader(str(tmp_path / "digits.npy"), value_range=(0, 256), channels=1, size=8))
    tok = make_tokenizer("msvq", input_shape=[1, 8, 8], patch=[2, 2], scales=[1, 2, 4], codebook_size=16)
    tok.fit([s.data for s in samples])
    tokens = tok.encode_arrays([s.data for s in samples])
    assert len(tokens) == 40 and tokens[0].shape == (21,) and tokens[0].dtype == np.int64
    back = tok.decode_arrays(tokens)
    assert back[0].shape == (1, 8, 8)


# ------------------------------------------------------------------ artifacts


def test_artifact_round_trip_digest_and_layout(tmp_path, faces):
    train, test = faces
    tok = MultiScaleVQ(input_shape=(1, 32, 32), patch=(4, 4), scales=[1, 2, 4, 8], codebook_size=32, fit_iters=10)
    tok.fit(train)
    digest = tok.save(str(tmp_path / "msvq"))
    assert sorted(p.name for p in (tmp_path / "msvq").iterdir()) == ["tokenizer.json", "weights.safetensors"]
    doc = json.loads((tmp_path / "msvq" / "tokenizer.json").read_text())
    assert doc["type"] == "msvq" and doc["digest"] == digest and doc["vocab_size"] == 32
    assert doc["tokens_per_sample"] == 85 and doc["layout"]["boundaries"] == [0, 1, 5, 21, 85]
    assert doc["layout"]["axes"] == ["scale", "y", "x"]
    again = load_tokenizer(str(tmp_path / "msvq"))
    assert isinstance(again, MultiScaleVQ) and again.digest == digest
    assert torch.equal(again.encode(test), tok.encode(test))
    assert tok.save(str(tmp_path / "again")) == digest  # the digest is content, not time or path
    assert MultiScaleVQ(**tok.config()).fit(train).digest == digest  # a refit with the same seed is the same
    other = MultiScaleVQ(**{**tok.config(), "seed": 1}).fit(train)
    assert other.digest != digest
    pos = tok.positions()
    assert pos.shape == (85, 3) and pos[0].tolist() == [0, 0, 0] and pos[-1].tolist() == [3, 7, 7]

    vq = PatchVQ(input_shape=(1, 32, 32), patch=(4, 4), codebook_size=16, fit_iters=5).fit(train)
    assert vq.positions().shape == (64, 2) and vq.layout()["axes"] == ["y", "x"]


def test_vqvae_artifact_on_s3(s3_bucket, digits):
    train, test = digits
    tok = VQVAE(input_shape=(1, 8, 8), downsample=2, codebook_size=16, hidden=8, code_dim=4).fit(train, steps=5)
    uri = f"{s3_bucket}/tokenizers/vqvae"
    digest = tok.save(uri)
    assert storage_for(uri).exists(f"{uri}/weights.safetensors")
    again = load_tokenizer(uri, device="cpu")
    assert again.provenance["seconds"] >= 0 and "device" not in again.config()
    assert again.digest == digest and torch.equal(again.encode(test), tok.encode(test))
    assert torch.allclose(again.decode(tok.encode(test)), tok.decode(tok.encode(test)))


def test_tampered_or_incomplete_artifacts_are_refused(tmp_path, faces):
    tok = PatchVQ(input_shape=(1, 32, 32), patch=(8, 8), codebook_size=8, fit_iters=5).fit(faces[0])
    for name in ("edited", "corrupt", "partial"):
        tok.save(str(tmp_path / name))
    cfg = tmp_path / "edited" / "tokenizer.json"
    cfg.write_text(cfg.read_text().replace('"codebook_size": 8', '"codebook_size": 9'))
    with pytest.raises(TokenizerError, match="does not match its digest"):
        load_tokenizer(str(tmp_path / "edited"))
    weights = tmp_path / "corrupt" / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(TokenizerError, match="weights.safetensors does not match"):
        load_tokenizer(str(tmp_path / "corrupt"))
    (tmp_path / "partial" / "weights.safetensors").unlink()
    with pytest.raises(TokenizerError, match="artifact incomplete"):
        load_tokenizer(str(tmp_path / "partial"))
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'bpe'; use one of codec, flexvq, msvq, octree, patch_vq, text, vqvae"):
        make_tokenizer("bpe")


def test_wrong_shapes_and_tokens_say_how_to_fix(faces):
    tok = PatchVQ(input_shape=(1, 32, 32), patch=(4, 4), codebook_size=8, fit_iters=5).fit(faces[0])
    with pytest.raises(TokenizerError, match=r"expects samples of shape \(1, 32, 32\), got \(1, 24, 24\); set the reader"):
        tok.encode(torch.zeros(2, 1, 24, 24))
    with pytest.raises(TokenizerError, match="decodes 64 tokens per sample"):
        tok.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(TokenizerError, match=r"token ids must lie in \[0, 8\)"):
        tok.decode(torch.full((1, 64), 8))
    with pytest.raises(TokenizerError, match="not a multiple of patch"):
        PatchVQ(input_shape=(1, 30, 30), patch=(4, 4))
    with pytest.raises(TokenizerError, match="within the patch grid"):
        MultiScaleVQ(input_shape=(1, 32, 32), patch=(4, 4), scales=[1, 16])
    with pytest.raises(TokenizerError, match="powers of two"):
        VQVAE(input_shape=(1, 32, 32), downsample=3)
