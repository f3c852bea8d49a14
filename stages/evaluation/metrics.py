"""Sample-quality metrics for generators: plain numpy/scipy/torch, computed in float64.

Feature-space metrics take two sets of feature vectors (``feats_ND``, from
:mod:`stages.evaluation.features` for images and video):

- :func:`frechet_distance` / :func:`frechet_from_features`: FID and FVD.
- :func:`kernel_inception_distance`: KID, the unbiased MMD^2 with the cubic kernel.
- :func:`precision_recall`: the k-NN manifold precision and recall of Kynkäänniemi et al. 2019.

Point-cloud set metrics (Achlioptas et al. 2018; Yang et al. 2019, PointFlow) take
two sets of clouds, each a list of ``(N, 3)`` arrays or one ``(B, N, 3)`` array,
and a per-pair distance ``metric``:

- ``"cd"``: :func:`stages.modalities.metrics.chamfer_distance`, the mean *unsquared* Euclidean
  distance to the nearest point, averaged over both directions.
- ``"emd"``: :func:`earth_movers_distance`, the mean Euclidean distance under the optimal
  one-to-one matching; clouds of a pair must have the same number of points.

Both are in the unit of the coordinates, so MMD-CD and MMD-EMD read as distances.

Inputs may be numpy arrays or torch tensors; results are Python floats or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from arpipe.stages.modalities.metrics import chamfer_distance

CloudMetric = Literal["cd", "emd"]
Clouds = Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor

# Distance blocks of at most this many float64 entries (~256 MiB) in the k-NN searches.
_BLOCK_ENTRIES = 1 << 25


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 numpy array from a numpy array or a torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _vector(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.atleast_1d(_numpy(x)).reshape(-1)


def _matrix(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A float64 (N, D) numpy array from a numpy array or a torch tensor."""
    a = _numpy(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, features) array, got shape {a.shape}")
    return a


# ---------------------------------------------------------------------------- Fréchet distance


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between two Gaussians (the FID/FVD formula).

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))``. The trace of ``sqrtm(S1 S2)`` is taken as the
    sum of square roots of the eigenvalues of ``sqrt(S1) S2 sqrt(S1)``: the same eigenvalues, but
    of a symmetric PSD matrix, so no complex round-off and no singular-matrix fallback is needed
    (covariances of fewer samples than dimensions are singular).
    """
    mu1_D, mu2_D = _vector(mu1), _vector(mu2)
    s1_DD, s2_DD = _matrix(np.atleast_2d(_numpy(sigma1)), "sigma1"), _matrix(np.atleast_2d(_numpy(sigma2)), "sigma2")
    d = mu1_D.shape[0]
    if mu2_D.shape != (d,) or s1_DD.shape != (d, d) or s2_DD.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1_D.shape}, sigma1 {s1_DD.shape}, "
                         f"mu2 {mu2_D.shape}, sigma2 {s2_DD.shape}")
    root1 = _sqrt_psd(s1_DD)
    m = root1 @ s2_DD @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1_D - mu2_D
    value = float(diff @ diff + np.trace(s1_DD) + np.trace(s2_DD) - 2 * tr_covmean)
    return max(value, 0.0)  # it is a squared distance; round-off can take it a hair below 0


def gaussian_stats(feats_ND: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set, float64."""
    f = _matrix(feats_ND, "feats")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_from_features(feats_a_ND: np.ndarray | torch.Tensor, feats_b_MD: np.ndarray | torch.Tensor) -> float:
    """FID (image features) or FVD (video features) between two feature sets."""
    return frechet_distance(*gaussian_stats(feats_a_ND), *gaussian_stats(feats_b_MD))


# ---------------------------------------------------------------------------- KID


def _cubic_kernel(x_ND: np.ndarray, y_MD: np.ndarray) -> np.ndarray:
    return (x_ND @ y_MD.T / x_ND.shape[1] + 1) ** 3


def _mmd2_unbiased(x_mD: np.ndarray, y_mD: np.ndarray) -> float:
    m = x_mD.shape[0]
    k_xx, k_yy, k_xy = _cubic_kernel(x_mD, x_mD), _cubic_kernel(y_mD, y_mD), _cubic_kernel(x_mD, y_mD)
    off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diag - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor, *,
                              subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and standard deviation of the unbiased MMD^2 over random subsets.

    The kernel is ``k(x, y) = (x.y / d + 1)^3``. Each subset draws ``min(subset_size, N, M)``
    samples without replacement from each set (as torch-fidelity and clean-fid do); ``seed``
    makes the draws reproducible. The std is the population std over the subsets.
    """
    a = _matrix(feats_a, "feats_a")
    b = _matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------- precision / recall


def _rows_per_block(columns: int) -> int:
    return max(1, _BLOCK_ENTRIES // max(columns, 1))


def _knn_radii(x_ND: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    n = x_ND.shape[0]
    if n <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} samples, got {n}")
    step = _rows_per_block(n)
    radii = []
    for s in range(0, n, step):
        d = torch.cdist(x_ND[s:s + step], x_ND)
        # index 0 of the sorted row is the point itself (distance 0), so index k is the k-th neighbour
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _inside_manifold(query_QD: torch.Tensor, support_ND: torch.Tensor, radii_N: torch.Tensor) -> torch.Tensor:
    """Whether each query point lies in at least one support point's k-NN ball."""
    step = _rows_per_block(support_ND.shape[0])
    inside = [(torch.cdist(query_QD[s:s + step], support_ND) <= radii_N[None]).any(1)
              for s in range(0, query_QD.shape[0], step)]
    return torch.cat(inside)


def precision_recall(real_ND: np.ndarray | torch.Tensor, fake_MD: np.ndarray | torch.Tensor, *,
                     k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points whose radius is the distance to
    the point's k-th nearest neighbour in the same set. Precision is the share of fake samples
    inside the real manifold (fidelity); recall the share of real samples inside the fake
    manifold (diversity). A point on a ball's boundary counts as inside.
    """
    real = torch.from_numpy(_matrix(real_ND, "real"))
    fake = torch.from_numpy(_matrix(fake_MD, "fake"))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    precision = _inside_manifold(fake, real, _knn_radii(real, k)).double().mean()
    recall = _inside_manifold(real, fake, _knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------- point clouds


def _cloud(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    c = x.detach().cpu().double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    if c.ndim != 2:
        raise ValueError(f"a point cloud must be an (N, 3) array, got shape {tuple(c.shape)}")
    return c


def _clouds(clouds: Clouds, name: str) -> list[torch.Tensor]:
    out = [_cloud(c) for c in clouds]
    if not out:
        raise ValueError(f"{name} holds no point clouds")
    return out


def earth_movers_distance(a_N3: np.ndarray | torch.Tensor, b_N3: np.ndarray | torch.Tensor) -> float:
    """Exact Earth Mover's distance: the mean Euclidean distance between matched points under the
    optimal one-to-one matching (Hungarian algorithm, O(N^3): meant for clouds of up to a few
    thousand points).

    Both clouds must have the same number of points; subsample the larger one first (e.g. with
    farthest-point or seeded random sampling) when they do not.
    """
    a, b = _cloud(a_N3), _cloud(b_N3)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"EMD needs clouds of equal size, got {a.shape[0]} and {b.shape[0]} points: "
                         "subsample both to the same number of points first")
    if a.shape[0] == 0:
        return float("inf")
    cost = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _distance_fn(metric: CloudMetric):
    if metric == "cd":
        return chamfer_distance
    if metric == "emd":
        return earth_movers_distance
    raise ValueError(f"unknown point-cloud metric {metric!r}: use 'cd' (Chamfer) or 'emd' (Earth Mover's)")


def pairwise_distances(set_a: Clouds, set_b: Clouds, metric: CloudMetric = "cd") -> np.ndarray:
    """The (len(set_a), len(set_b)) matrix of cloud-to-cloud distances."""
    dist = _distance_fn(metric)
    a, b = _clouds(set_a, "set_a"), _clouds(set_b, "set_b")
    return np.array([[dist(x, y) for y in b] for x in a], dtype=np.float64).reshape(len(a), len(b))


def _self_distances(clouds: list[torch.Tensor], metric: CloudMetric) -> np.ndarray:
    """Pairwise distances within one set; both metrics are symmetric, so each pair is computed once."""
    dist = _distance_fn(metric)
    n = len(clouds)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = dist(clouds[i], clouds[j])
    return out


def mmd(sample_set: Clouds, ref_set: Clouds, metric: CloudMetric = "cd") -> float:
    """Minimum matching distance: the mean over reference clouds of the distance to the closest
    sample (fidelity; 0 when every reference has an exact copy among the samples)."""
    return float(pairwise_distances(ref_set, sample_set, metric).min(1).mean())


def coverage(sample_set: Clouds, ref_set: Clouds, metric: CloudMetric = "cd") -> float:
    """Share of reference clouds that are the nearest reference of at least one sample (diversity).

    Ties between equally near references go to the first one.
    """
    d_SR = pairwise_distances(sample_set, ref_set, metric)
    return float(np.unique(d_SR.argmin(1)).size / d_SR.shape[1])


def one_nn_accuracy(sample_set: Clouds, ref_set: Clouds, metric: CloudMetric = "cd") -> float:
    """Leave-one-out 1-nearest-neighbour accuracy over the union of both sets (PointFlow's 1-NNA).

    Each cloud is labelled by the set of its nearest other cloud; the result is the share labelled
    correctly. 0.5 means the sets are indistinguishable, 1.0 that they are fully separated, and
    below 0.5 that samples sit closer to references than to each other (e.g. memorised copies).
    Clouds are ordered references first, then samples, and ties go to the first in that order.
    """
    refs, samples = _clouds(ref_set, "ref_set"), _clouds(sample_set, "sample_set")
    d_RS = pairwise_distances(refs, samples, metric)
    d_all = np.block([[_self_distances(refs, metric), d_RS], [d_RS.T, _self_distances(samples, metric)]])
    np.fill_diagonal(d_all, np.inf)
    is_ref = np.arange(d_all.shape[0]) < len(refs)
    return float((is_ref[d_all.argmin(1)] == is_ref).mean())
