"""Sample-quality metrics on feature vectors or points [N, D]."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "gaussian_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "FeatureStats",
    "frechet_distance_from_stats",
    "kid",
    "precision_recall",
    "wasserstein2",
    "mmd",
]


def _check_features(a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D; got {tuple(a.shape)} and {tuple(b.shape)}")


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D]."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D]; got {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu_1: Tensor, cov_1: Tensor, mu_2: Tensor, cov_2: Tensor) -> float:
    """||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2)).

    Tr((C_1 C_2)^(1/2)) is computed as the nuclear norm (sum of singular values) of C_2^(1/2) C_1^(1/2): with
    A = C_2^(1/2) C_1^(1/2), A^T A = C_1^(1/2) C_2 C_1^(1/2) has the spectrum of C_1 C_2. This stays real, exactly
    symmetric in the two sets, and accurate for the rank-deficient covariances of few samples in many dimensions
    (the distance of a set to itself is 0 to about 1e-12), where scipy's sqrtm of the non-symmetric product can
    turn complex or lose digits.
    """
    mu_1, cov_1, mu_2, cov_2 = (v.double() for v in (mu_1, cov_1, mu_2, cov_2))
    tr_sqrt = torch.linalg.svdvals(_sqrt_psd(cov_2) @ _sqrt_psd(cov_1)).sum()
    return ((mu_1 - mu_2).pow(2).sum() + cov_1.trace() + cov_2.trace() - 2 * tr_sqrt).item()


class FeatureStats:
    """Streaming first and second moments of features: n, sum f [D] and sum f f^T [D, D] in float64.

    Partial statistics of disjoint parts (one per actor or data block) merge exactly with `merge`, so the Fréchet
    distance of a data set of any size needs O(D^2) memory, never its features.
    """

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> FeatureStats:
        """Add features [N, D]; returns self."""
        f = features.detach().double().cpu()
        if f.dim() != 2 or f.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be [N, {self.sum.shape[0]}]; got {tuple(f.shape)}")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another part's statistics; returns self."""
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge statistics of {other.sum.shape[0]}-d and {self.sum.shape[0]}-d features")
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        return self

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean [D] and unbiased covariance [D, D], as `gaussian_stats` gives for the same features."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors; got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean, (cov + cov.T) / 2

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.asarray(self.n), "sum": self.sum.numpy(), "outer": self.outer.numpy()}

    @classmethod
    def from_arrays(cls, arrays: dict) -> FeatureStats:
        stats = cls(int(np.asarray(arrays["sum"]).shape[0]))
        stats.n = int(arrays["n"])
        stats.sum = torch.as_tensor(np.asarray(arrays["sum"]), dtype=torch.float64).clone()
        stats.outer = torch.as_tensor(np.asarray(arrays["outer"]), dtype=torch.float64).clone()
        return stats


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians of two streamed feature statistics."""
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def frechet_distance_from_features(f_1: Tensor, f_2: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    _check_features(f_1, f_2)
    return frechet_distance(*gaussian_stats(f_1), *gaussian_stats(f_2))


def _mmd2_unbiased(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> Tensor:
    m, n = k_xx.shape[0], k_yy.shape[0]
    sum_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return sum_xx + sum_yy - 2 * k_xy.mean()


def kid(
    f_1: Tensor, f_2: Tensor, subsets: int = 100, subset_size: int = 1000, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Kernel distance (unbiased MMD^2, cubic polynomial kernel (x.y / D + 1)^3) over random subsets.

    Returns (mean, std) over subsets.
    """
    _check_features(f_1, f_2)
    m = min(subset_size, f_1.shape[0], f_2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set; got {f_1.shape[0]} and {f_2.shape[0]}")
    d = f_1.shape[1]
    a, b = f_1.double(), f_2.double()
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:m]]
        vals.append(_mmd2_unbiased((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3))
    v = torch.stack(vals)
    return v.mean().item(), (v.std().item() if subsets > 1 else 0.0)


def wasserstein2(x: Tensor, y: Tensor) -> float:
    """Exact W2 distance between two empirical point clouds [N, D], [M, D] (POT's network simplex)."""
    _check_features(x, y)
    # detach and move to the CPU: the solver is numpy (inputs may live on a GPU or carry gradients)
    cost = torch.cdist(x.detach().double(), y.detach().double()).pow(2).cpu().numpy()
    return w2_from_cost(cost)


def w2_from_cost(cost: np.ndarray) -> float:
    """sqrt of the exact optimal transport cost between uniform weights on the rows and on the columns of the
    squared-distance matrix `cost` [N, M] (POT's network simplex)."""
    # POT is imported where it is used: it pulls in scipy.stats and scikit-learn (~2.5 s), which every Ray worker
    # that imports fm would otherwise pay at start
    import ot

    n, m = cost.shape
    return float(np.sqrt(ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), cost, numItermax=10_000_000)))


def mmd(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels exp(-||a - b||^2 / (2 h^2)) over the given bandwidths h."""
    _check_features(x, y)
    x, y = x.double(), y.double()

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum((torch.exp(-d2 / (2 * h * h)) for h in bandwidths), torch.zeros_like(d2))

    return _mmd2_unbiased(k(x, x), k(y, y), k(x, y)).item()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets [N, D] and [M, D].

    Each set's manifold is the union of balls around its points with radius the distance to the k-th nearest
    neighbour in the same set. Precision: the fraction of fake points inside the real manifold; recall: the
    fraction of real points inside the fake manifold. Memory is O(N M): call it on bounded subsets.
    """
    _check_features(real, fake)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} points per set; got {real.shape[0]} and {fake.shape[0]}"
        )
    r, f = real.double(), fake.double()

    def radii(x: Tensor) -> Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # the 0-th neighbour is the point itself

    r_real, r_fake = radii(r), radii(f)
    d = torch.cdist(f, r)  # [M, N]
    precision = (d <= r_real[None, :]).any(1).double().mean().item()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean().item()
    return precision, recall
