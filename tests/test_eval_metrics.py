"""The evaluation metrics agree with their papers' definitions, written out here as plain loops,
and a user-provided TorchScript network turns real digits into features that FID can rank."""

from __future__ import annotations

import hashlib
import itertools
import math

import boto3
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from arpipe.stages.evaluation import (
    FeatureExtractor,
    coverage,
    earth_movers_distance,
    frechet_distance,
    frechet_from_features,
    kernel_inception_distance,
    mmd,
    one_nn_accuracy,
    pairwise_distances,
    precision_recall,
    score_distributions,
)

# recent torch deprecates TorchScript, yet it is still the one weight format that loads without the model's code
pytestmark = pytest.mark.filterwarnings("ignore:.torch\\.jit\\.(script|save|load). is deprecated:DeprecationWarning")

# ---------------------------------------------------------------------------- references, as loops


def ref_frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def ref_mmd2_cubic(x, y):
    d = len(x[0])

    def k(p, q):
        return (sum(pi * qi for pi, qi in zip(p, q)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def dist(p, q):
    return math.sqrt(sum((pi - qi) ** 2 for pi, qi in zip(p, q)))


def ref_precision_recall(real, fake, k):
    def radii(points):
        return [sorted(dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    def share_inside(queries, support):
        r = radii(support)
        return sum(any(dist(q, s) <= r[j] for j, s in enumerate(support)) for q in queries) / len(queries)

    return share_inside(fake, real), share_inside(real, fake)


def ref_chamfer(a, b):
    a_to_b = sum(min(dist(p, q) for q in b) for p in a) / len(a)
    b_to_a = sum(min(dist(q, p) for p in a) for q in b) / len(b)
    return (a_to_b + b_to_a) / 2


def ref_emd(a, b):
    """Every one-to-one matching tried: for clouds of up to ~7 points."""
    n = len(a)
    return min(sum(dist(a[i], b[perm[i]]) for i in range(n)) for perm in itertools.permutations(range(n))) / n


def ref_matrix(set_a, set_b, pair):
    return [[pair(x, y) for y in set_b] for x in set_a]


def ref_mmd(samples, refs, pair):
    d = ref_matrix(refs, samples, pair)
    return sum(min(row) for row in d) / len(refs)


def ref_coverage(samples, refs, pair):
    covered = set()
    for s in samples:
        d = [pair(s, r) for r in refs]
        covered.add(d.index(min(d)))
    return len(covered) / len(refs)


def ref_1nna(samples, refs, pair):
    union = [(c, True) for c in refs] + [(c, False) for c in samples]
    correct = 0
    for i, (c, label) in enumerate(union):
        best, best_label = math.inf, None
        for j, (other, other_label) in enumerate(union):
            if j != i and pair(c, other) < best:
                best, best_label = pair(c, other), other_label
        correct += best_label == label
    return correct / len(union)


def clouds(rng, count, points, offset=0.0):
    """Noisy spheres of random radius, like a small shape data set."""
    out = []
    for _ in range(count):
        p = rng.normal(size=(points, 3))
        p = p / np.linalg.norm(p, axis=1, keepdims=True) * rng.uniform(0.5, 1.5)
        out.append(p + 0.05 * rng.normal(size=p.shape) + offset)
    return out


# ---------------------------------------------------------------------------- feature-space metrics


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 0.3
    fid = frechet_from_features(a, b)
    assert fid == pytest.approx(ref_frechet(a, b), abs=1e-6)
    assert frechet_from_features(b, a) == pytest.approx(fid, abs=1e-6)
    assert frechet_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_from_features(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(fid, rel=1e-4)
    # from statistics directly, and with fewer samples than dimensions (singular covariances)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(16.0, abs=1e-6)
    few = frechet_from_features(a[:8], b[:8])
    assert math.isfinite(few) and few > 0
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_from_features(a[:1], b)


def test_kid_is_the_unbiased_cubic_kernel_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    mean, std = kernel_inception_distance(a, b, subsets=1, subset_size=12)
    assert mean == pytest.approx(ref_mmd2_cubic(a.tolist(), b.tolist()), rel=1e-9)
    assert std == 0.0
    # many subsets of a larger set: reproducible with a seed, near 0 for one distribution
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    assert kernel_inception_distance(x, y, subsets=20, subset_size=50) == kernel_inception_distance(
        x, y, subsets=20, subset_size=50)
    same_mean, same_std = kernel_inception_distance(x, y, subsets=20, subset_size=50)
    apart_mean, _ = kernel_inception_distance(x, y + 1, subsets=20, subset_size=50)
    assert abs(same_mean) < 3 * same_std + 1e-3 and apart_mean > 10 * same_std


def test_precision_recall_match_the_knn_manifold_definition():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) * 0.7 + 0.8
    ours = precision_recall(real, fake, k=3)
    assert ours == pytest.approx(ref_precision_recall(real.tolist(), fake.tolist(), 3))
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, fake + 100, k=3) == (0.0, 0.0)
    # mode collapse: every fake sample is realistic, but the fakes cover little of the real set
    collapsed = real[:1] + 0.01 * rng.normal(size=(25, 4))
    precision, recall = precision_recall(torch.from_numpy(real), collapsed, k=3)
    assert precision == 1.0 and recall < 0.2


# ---------------------------------------------------------------------------- point clouds


def test_emd_is_the_optimal_matching_and_refuses_unequal_clouds():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    assert earth_movers_distance(a, b) == pytest.approx(ref_emd(a.tolist(), b.tolist()), rel=1e-9)
    assert earth_movers_distance(torch.from_numpy(a), b[::-1].copy()) == pytest.approx(earth_movers_distance(a, b))
    # a translation by t moves every point by |t|, and no matching does better
    cloud = rng.normal(size=(32, 3))
    assert earth_movers_distance(cloud, cloud + [0.3, 0.0, 0.4]) == pytest.approx(0.5, rel=1e-9)
    with pytest.raises(ValueError, match="equal size.*32 and 31"):
        earth_movers_distance(cloud, cloud[:31])


def test_pairwise_chamfer_mmd_coverage_and_1nna_match_loops():
    rng = np.random.default_rng(4)
    samples = [c[: rng.integers(16, 33)] for c in clouds(rng, 7, 32)]  # clouds of different sizes
    refs = clouds(rng, 6, 24, offset=0.1)
    s_list, r_list = [c.tolist() for c in samples], [c.tolist() for c in refs]
    np.testing.assert_allclose(pairwise_distances(samples, refs, "cd"), ref_matrix(s_list, r_list, ref_chamfer),
                               rtol=1e-9)
    assert mmd(samples, refs, "cd") == pytest.approx(ref_mmd(s_list, r_list, ref_chamfer), rel=1e-9)
    assert coverage(samples, refs, "cd") == ref_coverage(s_list, r_list, ref_chamfer)
    assert one_nn_accuracy(samples, refs, "cd") == ref_1nna(s_list, r_list, ref_chamfer)
    # a batch array and torch tensors work as sets too
    batch = torch.from_numpy(np.stack(refs))
    assert mmd(samples, batch, "cd") == pytest.approx(mmd(samples, refs, "cd"))


def test_emd_set_metrics_match_loops():
    rng = np.random.default_rng(5)
    samples, refs = clouds(rng, 6, 6), clouds(rng, 5, 6, offset=0.2)
    s_list, r_list = [c.tolist() for c in samples], [c.tolist() for c in refs]
    assert mmd(samples, refs, "emd") == pytest.approx(ref_mmd(s_list, r_list, ref_emd), rel=1e-9)
    assert coverage(samples, refs, "emd") == ref_coverage(s_list, r_list, ref_emd)
    assert one_nn_accuracy(samples, refs, "emd") == ref_1nna(s_list, r_list, ref_emd)


@pytest.mark.parametrize("metric", ["cd", "emd"])
def test_point_cloud_metrics_on_ideal_and_separated_sets(metric):
    rng = np.random.default_rng(6)
    refs = clouds(rng, 8, 16)
    assert mmd(refs, refs, metric) == 0.0
    assert coverage(refs, refs, metric) == 1.0
    assert one_nn_accuracy(refs, refs, metric) == 0.0  # every cloud's nearest neighbour is its copy
    far = clouds(rng, 8, 16, offset=10.0)
    assert one_nn_accuracy(far, refs, metric) == 1.0
    assert mmd(far, refs, metric) > 5
    # a collapsed generator: all samples near one reference cover only it
    collapsed = [refs[0] + 0.001 * rng.normal(size=refs[0].shape) for _ in range(8)]
    assert coverage(collapsed, refs, metric) == 1 / 8


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="'hausdorff'.*'cd'.*'emd'"):
        pairwise_distances([np.zeros((2, 3))], [np.zeros((2, 3))], "hausdorff")


# ---------------------------------------------------------------------------- features


class TinyImageNet(torch.nn.Module):
    """A stand-in for Inception: random convolutions, global pooling, a feature vector."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


class TinyVideoNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3, 4))


def save_scripted(net: torch.nn.Module, path) -> str:
    torch.manual_seed(0)
    net.__init__()  # seeded weights
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return str(path)


@pytest.fixture(scope="module")
def digits_NCHW() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]


def test_feature_network_ranks_real_digits_above_noise(tmp_path, digits_NCHW):
    path = save_scripted(TinyImageNet(), tmp_path / "tiny_inception.pt")
    extractor = FeatureExtractor.load(path, kind="image", input_size=16)
    assert extractor.digest == "sha256:" + hashlib.sha256((tmp_path / "tiny_inception.pt").read_bytes()).hexdigest()

    feats = extractor.features(digits_NCHW, batch_size=256)
    assert feats.shape == (1797, 48) and feats.dtype == np.float64
    again = FeatureExtractor.load(f"file://{path}", kind="image", input_size=16).features(digits_NCHW[:100])
    np.testing.assert_array_equal(again, feats[:100])  # batch size and loader do not change features
    rgb = extractor.features(np.repeat(digits_NCHW[:10], 3, axis=1))
    np.testing.assert_array_equal(rgb, feats[:10])  # grayscale is repeated to 3 channels

    noise = np.random.default_rng(0).uniform(size=(898, 1, 8, 8)).astype(np.float32)
    half_a, half_b = feats[::2], feats[1::2]
    fid_digits = frechet_from_features(half_a, half_b)
    fid_noise = frechet_from_features(half_a, extractor.features(noise))
    assert fid_digits < fid_noise / 10
    kid_digits, _ = kernel_inception_distance(half_a, half_b, subsets=10, subset_size=200)
    kid_noise, _ = kernel_inception_distance(half_a, extractor.features(noise), subsets=10, subset_size=200)
    assert kid_digits < kid_noise


def test_video_features_resize_every_frame(tmp_path):
    path = save_scripted(TinyVideoNet(), tmp_path / "tiny_i3d.pt")
    extractor = FeatureExtractor.load(path, kind="video", input_size=12)
    video_NCTHW = torch.rand(5, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    feats = extractor.features(video_NCTHW, batch_size=2)
    assert feats.shape == (5, 8)
    net = torch.jit.load(path)
    frames = torch.nn.functional.interpolate(video_NCTHW[:, :, 2].expand(-1, 3, -1, -1), size=(12, 12),
                                             mode="bilinear", align_corners=False)
    still = frames[:, :, None].expand(-1, -1, 4, -1, -1)  # a clip of one repeated frame
    np.testing.assert_allclose(extractor.features(video_NCTHW[:, :, 2:3].expand(-1, -1, 4, -1, -1)),
                               net(still).detach().double().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, C, T, H, W\)"):
        extractor.features(video_NCTHW[:, :, 0])


def test_a_file_that_is_not_torchscript_gets_a_clear_error(tmp_path, digits_NCHW):
    text = tmp_path / "inception.txt"
    text.write_text("not a network\n")
    with pytest.raises(ValueError, match=r"inception\.txt.*not a TorchScript file.*torch\.jit\.save"):
        FeatureExtractor.load(str(text), kind="image")
    pickled = tmp_path / "state_dict.pt"
    torch.save(TinyImageNet().state_dict(), pickled)
    with pytest.raises(ValueError, match=r"state_dict\.pt.*not a TorchScript file"):
        FeatureExtractor.load(str(pickled), kind="image")
    with pytest.raises(ValueError, match=r"missing\.pt.*not found.*torch\.jit\.save"):
        FeatureExtractor.load(str(tmp_path / "missing.pt"), kind="image")
    extractor = FeatureExtractor.load(save_scripted(TinyImageNet(), tmp_path / "net.pt"), kind="image")
    with pytest.raises(ValueError, match="divide uint8 data by 255"):
        extractor.features((digits_NCHW[:4] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="rescale"):
        extractor.features(digits_NCHW[:4] * 255)


# ---------------------------------------------------------------------------- plots


def test_score_distribution_plot_is_a_png(tmp_path):
    rng = np.random.default_rng(7)
    scores = {
        "psnr": rng.normal(30, 2, size=500),
        "with_nan": np.r_[rng.normal(size=50), [np.nan, np.inf]],
        "constant": np.full(20, 0.5),
        "empty": np.array([]),
    }
    path = score_distributions(scores, tmp_path / "plots" / "scores.png", title="sample scores")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn
    assert (tmp_path / "plots" / "scores.png").stat().st_size > 10_000
    with Image.open(score_distributions({}, tmp_path / "none.png")) as image:
        assert image.format == "PNG"


def test_feature_network_loads_from_s3(tmp_path, s3_bucket, s3_env):
    path = save_scripted(TinyImageNet(), tmp_path / "net.pt")
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.upload_file(path, s3_bucket[len("s3://"):], "models/net.pt")
    remote = FeatureExtractor.load(f"{s3_bucket}/models/net.pt", kind="image")
    assert remote.digest == FeatureExtractor.load(path, kind="image").digest
    with pytest.raises(ValueError, match="not found"):
        FeatureExtractor.load(f"{s3_bucket}/models/missing.pt", kind="image")


# ---------------------------------------------------------------------------- one round-trip metric


@pytest.mark.parametrize("modality", ["image", "video"])
def test_tokenizer_report_and_evaluate_stage_give_the_same_round_trip(tmp_path, digits_NCHW, modality):
    """A user compares the tokenizer stage's fit report with the evaluate stage's ``reconstruction/*``
    metrics for the same data and tokenizer: PSNR and SSIM are the same numbers (8x8 digits take the
    small-image window rule; video clips take per-frame SSIM)."""
    import os

    import skimage

    from arpipe.pipeline.stage import StageContext
    from arpipe.schemas.sample import EvaluateStage as EvaluateSpec
    from arpipe.stages.evaluate import EvaluateStage, Scores
    from arpipe.stages.modalities import PatchVQ, load_tokenizer, open_reader
    from arpipe.stages.tokenizer import reconstruction_metrics

    if modality == "image":
        folder = tmp_path / "digits"
        folder.mkdir()
        for i, digit in enumerate(digits_NCHW[:24]):
            Image.fromarray((digit[0] * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
        source = {"modality": "image", "uri": str(folder), "channels": 1, "resize": "none", "labels": None}
        make = dict(input_shape=(1, 8, 8), patch=(2, 2), codebook_size=16)
    else:
        gif = os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")
        source = {"modality": "video", "uri": gif, "clip_len": 8, "size": 16, "labels": None}
        make = dict(input_shape=(3, 8, 16, 16), patch=(2, 4, 4), codebook_size=32, modality="video")
    options = {k: v for k, v in source.items() if k not in ("modality", "uri")}
    originals = [s.data for s in open_reader(modality, source["uri"], **options)]
    fitted = PatchVQ(**make, fit_iters=10).fit(originals)
    fitted.save(str(tmp_path / "tokenizer"))

    # the tokenizer stage's path: its fit report's metrics on (originals, their round trip)
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    tokens = tok.encode_arrays(originals)
    report = reconstruction_metrics(tok, modality, originals, tok.decode_arrays(tokens), tokens)

    # the evaluate stage's path: reconstruction of the same source through the saved tokenizer
    spec = EvaluateSpec.model_validate({"kind": "evaluate", "reconstruction": {
        "tokenizer": str(tmp_path / "tokenizer"), "source": source}})
    out = tmp_path / "evaluate"
    ctx = StageContext(name="evaluate", kind="evaluate", fingerprint="0" * 64, out_uri=str(out), work_dir=out,
                       pipeline_dir=tmp_path)
    scores = Scores(out / "metrics" / "scores.parquet")
    EvaluateStage(spec, ctx).reconstruction(scores)

    assert set(scores.summary) == {"reconstruction/psnr", "reconstruction/ssim"}
    assert scores.summary["reconstruction/psnr"] == report["psnr"]
    assert scores.summary["reconstruction/ssim"] == report["ssim"]
    assert 10 < report["psnr"] < 100 and 0 < report["ssim"] < 1   # lossy, not broken
    assert len(scores.values[f"{modality} ssim (reconstruction)"]) == len(originals)   # one value per sample (clip)
