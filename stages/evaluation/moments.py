"""Sufficient statistics of a feature set that merge across shards: what a sharded FID/FVD reduces.

Each shard of samples gives ``Moments.of(features_ND)``: its count, mean and centred scatter matrix
``sum (x - mean)(x - mean)^T``. Two shards merge exactly (Chan, Golub and LeVeque's pairwise update),
without the cancellation that raw sums of ``x x^T`` suffer, so the merged mean and covariance equal the
ones of all features stacked to float64 rounding, whatever the shard sizes and order::

    total = Moments.of(shard_a).merge(Moments.of(shard_b))
    mean_D, cov_DD = total.gaussian()          # == gaussian_stats(np.concatenate([shard_a, shard_b]))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """``n`` feature vectors as their mean ``(D,)`` and centred scatter ``(D, D)``, in float64."""

    n: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, feats_ND: np.ndarray) -> Moments:
        f = np.asarray(feats_ND, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        mean = f.mean(0) if len(f) else np.zeros(f.shape[1])
        centred = f - mean
        return cls(len(f), mean, centred.T @ centred)

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"feature sizes differ: {self.mean.shape[0]} vs {other.mean.shape[0]}")
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, scatter)

    def gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance, as :func:`~.metrics.gaussian_stats` gives them for the stacked set."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.mean, self.scatter / (self.n - 1)
