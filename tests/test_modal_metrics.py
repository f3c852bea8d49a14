"""The reconstruction metrics a tokenizer report shows behave as their definitions say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import structural_similarity

from arpipe.stages.modalities import chamfer_distance, codebook_usage, psnr, ssim
from arpipe.stages.modalities.metrics import PSNR_CAP_DB, round_trip


def test_psnr_matches_its_definition():
    x = torch.rand(3, 1, 16, 16)
    assert torch.isinf(psnr(x, x)).all()
    y = (x + 0.1).clamp(0, 1)
    mse = ((x - y) ** 2).reshape(3, -1).mean(1)
    assert torch.allclose(psnr(x, y), 10 * torch.log10(1 / mse))
    assert float(psnr(x * 255, y * 255, data_range=255).mean()) == pytest.approx(float(psnr(x, y).mean()), rel=1e-5)


def test_ssim_agrees_with_scikit_image_and_works_in_3d():
    cam = torch.from_numpy(skdata.camera()[::4, ::4].astype(np.float32) / 255)[None, None]
    noisy = (cam + 0.05 * torch.randn(cam.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    ours = float(ssim(cam, noisy))
    ref = structural_similarity(cam[0, 0].numpy(), noisy[0, 0].numpy(), data_range=1.0, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False)
    assert ours == pytest.approx(ref, abs=0.02)
    assert float(ssim(cam, cam)) == pytest.approx(1.0, abs=1e-5)
    vol = torch.rand(2, 1, 12, 12, 12)
    assert ssim(vol, vol).shape == (2,) and float(ssim(vol, torch.rand_like(vol)).mean()) < 0.2
    tiny = torch.rand(4, 1, 8, 8)  # window shrinks to the image
    assert ssim(tiny, tiny).allclose(torch.ones(4), atol=1e-5)


def test_chamfer_distance():
    a = np.random.default_rng(0).normal(size=(500, 3))
    assert chamfer_distance(a, a) == 0.0
    shifted = a + np.array([0.0, 0.0, 0.01])
    assert chamfer_distance(a, shifted) == pytest.approx(chamfer_distance(shifted, a))
    assert chamfer_distance(a, shifted) <= 0.01 + 1e-12
    assert chamfer_distance(torch.zeros(1, 3), torch.ones(1, 3)) == pytest.approx(math.sqrt(3))
    assert chamfer_distance(np.zeros((0, 3)), a) == math.inf


def test_codebook_usage_and_perplexity():
    uniform = torch.arange(64).repeat(10)
    assert codebook_usage(uniform, 64) == {"used": 1.0, "perplexity": pytest.approx(64.0)}
    collapsed = torch.zeros(100, dtype=torch.long)
    assert codebook_usage(collapsed, 64) == {"used": 1 / 64, "perplexity": pytest.approx(1.0)}
    assert codebook_usage(np.array([0, 1, 1, 1]), 4)["perplexity"] == pytest.approx(math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))


def test_round_trip_clamps_to_the_data_range_and_caps_psnr():
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)).numpy()
    overshoot = x + 0.5 * (x > 0.5)   # a decoder overshooting where the original is bright
    clamped = np.clip(overshoot, 0, 1)
    scores = round_trip("image", list(x), list(overshoot))
    assert scores == round_trip("image", list(x), list(clamped))   # scored as a viewer shows it
    assert scores["psnr"] == pytest.approx(psnr(torch.from_numpy(x), torch.from_numpy(clamped)).tolist())
    assert round_trip("image", list(x), list(x))["psnr"] == [PSNR_CAP_DB] * 4   # exact: capped, not inf


def test_round_trip_scores_video_ssim_per_frame_and_volumes_in_3d():
    gen = torch.Generator().manual_seed(1)
    clip = torch.rand(2, 3, 5, 16, 16, generator=gen)   # x_BCTHW
    noisy = (clip + 0.1 * torch.randn(clip.shape, generator=gen)).clamp(0, 1)
    scores = round_trip("video", list(clip.numpy()), list(noisy.numpy()))
    for b in range(2):
        frames = ssim(clip[b].transpose(0, 1), noisy[b].transpose(0, 1))   # the clip's T frames as images
        assert scores["ssim"][b] == pytest.approx(float(frames.mean()), abs=1e-6)
        assert scores["ssim"][b] != pytest.approx(float(ssim(clip[b:b + 1], noisy[b:b + 1])), abs=1e-3)
    vol = torch.rand(2, 1, 12, 12, 12, generator=gen)
    assert round_trip("volume", list(vol.numpy()), list(vol.numpy()))["ssim"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_round_trip_window_fits_small_samples_and_skips_tiny_ones():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 8, 8, generator=gen)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    # 8x8: the largest odd window that fits is 7, with Wang et al.'s sigma 1.5
    ours = round_trip("image", list(x.numpy()), list(y.numpy()))["ssim"]
    assert ours == pytest.approx(ssim(x, y, window=7).tolist())
    assert ours != pytest.approx(ssim(x, y, window=11).tolist())   # not a 7-wide cut of a narrower Gaussian
    tiny = torch.rand(2, 1, 6, 6, generator=gen).numpy()
    assert set(round_trip("image", list(tiny), list(tiny))) == {"psnr"}   # no SSIM below 7 pixels a side
    clouds = [np.zeros((5, 3)), np.ones((4, 3))]
    assert round_trip("pointcloud", clouds, clouds) == {"chamfer": [0.0, 0.0]}
    with pytest.raises(ValueError, match="2 originals but 1 reconstructions"):
        round_trip("pointcloud", clouds, clouds[:1])
