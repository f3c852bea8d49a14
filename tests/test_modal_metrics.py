"""The reconstruction metrics a tokenizer report shows behave as their definitions say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import structural_similarity

from arpipe.stages.modalities import chamfer_distance, codebook_usage, psnr, ssim


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
