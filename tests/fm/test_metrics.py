import math

import pytest
import torch

from fm.data import TOY_DENSITIES, sample_toy, toy_entropy, toy_log_prob
from fm.metrics import frechet_distance, frechet_distance_from_features, kid, mmd, wasserstein2


def test_frechet_distance_of_two_gaussians_closed_form():
    # For commuting covariances the trace term is sum (sqrt(a_i) - sqrt(b_i))^2.
    d = 5
    a, b = torch.rand(d, dtype=torch.float64) + 0.5, torch.rand(d, dtype=torch.float64) + 0.5
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    c_1, c_2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu_1, mu_2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    expected = (mu_1 - mu_2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    assert frechet_distance(mu_1, c_1, mu_2, c_2) == pytest.approx(expected.item(), rel=1e-9)
    # non-commuting: compare with the eigen-decomposition of C_1 C_2
    c_3 = torch.randn(d, d, dtype=torch.float64)
    c_3 = c_3 @ c_3.T + 0.1 * torch.eye(d, dtype=torch.float64)
    tr_sqrt = torch.linalg.eigvals(c_1 @ c_3).real.clamp_min(0).sqrt().sum()
    expected = (mu_1 - mu_2).pow(2).sum() + c_1.trace() + c_3.trace() - 2 * tr_sqrt
    assert frechet_distance(mu_1, c_1, mu_2, c_3) == pytest.approx(expected.item(), rel=1e-8)


def test_frechet_distance_from_features_and_singular_covariances():
    f = torch.randn(5000, 4, dtype=torch.float64)
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient features (more dims than samples) stay finite and non-negative
    low = torch.randn(10, 64)
    assert 0 <= frechet_distance_from_features(low, torch.randn(10, 64)) < 1e4
    g = torch.randn(5000, 4, dtype=torch.float64) * 2 + 1
    # N(0, I) vs N(1, 4 I) in 4-D: 4 * 1 + 4 * (1 - 2)^2 = 8
    assert frechet_distance_from_features(f, g) == pytest.approx(8.0, rel=0.1)


def test_kid_identical_sets_near_zero_and_shift_positive():
    f, g = torch.randn(2000, 16), torch.randn(2000, 16)
    mean, std = kid(f, g, subsets=50, subset_size=500, generator=torch.Generator().manual_seed(0))
    assert abs(mean) < 3 * std
    same, _ = kid(f, f.clone(), subsets=50, subset_size=500, generator=torch.Generator().manual_seed(0))
    far, _ = kid(f, f + 1.0, subsets=50, subset_size=500, generator=torch.Generator().manual_seed(0))
    assert far > 0.5
    assert abs(same) < 0.02 * far


def test_wasserstein2_of_a_shift_and_mmd():
    x = torch.randn(300, 2, dtype=torch.float64)
    assert wasserstein2(x, x + torch.tensor([3.0, 4.0], dtype=torch.float64)) == pytest.approx(5.0, rel=1e-9)
    assert wasserstein2(x, x[torch.randperm(300)]) == pytest.approx(0.0, abs=1e-6)
    assert mmd(x, x + 2.0) > 0.1
    assert abs(mmd(x[:150], x[150:])) < 0.05


@pytest.mark.parametrize("name", TOY_DENSITIES)
def test_toy_densities_integrate_to_one(name):
    grid = torch.linspace(-5, 5, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    p = toy_log_prob(name, torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    cell = (grid[1] - grid[0]).item() ** 2
    assert p.sum().item() * cell == pytest.approx(1.0, abs=0.01)
    x = sample_toy(name, 2000, torch.Generator().manual_seed(0))
    assert torch.isfinite(toy_log_prob(name, x)).all()  # samples lie on the support


def test_toy_entropy_and_errors():
    assert toy_entropy("checkerboard") == pytest.approx(math.log(8))
    with pytest.raises(ValueError, match="unknown toy data set 'swiss'"):
        sample_toy("swiss", 10)
    with pytest.raises(ValueError, match="'moons' has no closed-form density"):
        toy_log_prob("moons", torch.zeros(1, 2))
    for name in ("moons", "spirals"):
        assert sample_toy(name, 7).shape == (7, 2)
