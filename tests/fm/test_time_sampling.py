"""Training-time densities (`fm.losses.TimeSampling`): the draws follow the stated density, the default is the
uniform draw every run made before the option existed, and the method's loss draws its times from it."""

import math

import pytest
import torch

from fm.losses import UNIFORM, TimeSampling, sample_time
from fm.methods import make_method


@pytest.mark.parametrize(
    "sampling", [TimeSampling("logit_normal", 0.0, 1.0), TimeSampling("logit_normal", 0.5, 0.7), UNIFORM]
)
def test_the_draws_follow_the_density(sampling):
    n = 200_000
    t = sample_time(n, 1.0, torch.Generator().manual_seed(0), sampling=sampling).double().sort().values
    # Kolmogorov-Smirnov against the stated CDF: the 1% critical value for n draws is 1.63 / sqrt(n) = 0.0036
    ks = (sampling.cdf(t) - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max().item()
    assert ks < 1.63 / math.sqrt(n)
    # and a histogram against the density, bin by bin (20 bins of 10,000 expected draws each on average)
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    counts = torch.histc(t, bins=20, min=0, max=1) / n
    mids = torch.linspace(0, 1, 2001, dtype=torch.float64)[1:-1]  # the density integrated per bin, trapezoids
    expected = torch.stack(
        [
            torch.trapezoid(sampling.density(g), g)
            for g in (mids[(mids >= a) & (mids <= b)] for a, b in zip(edges[:-1], edges[1:], strict=True))
        ]
    )
    assert torch.allclose(counts, expected, atol=0.004)


def test_logit_normal_puts_more_steps_in_the_middle_and_respects_t_max():
    g = torch.Generator().manual_seed(1)
    t = sample_time(100_000, 0.5, g, sampling=TimeSampling("logit_normal"))
    assert t.min() > 0 and t.max() < 0.5
    # the middle half of [0, t_max] holds P(|n| < logit(3/4)) = erf(log(3) / sqrt(2)) = 0.73 of the draws, not 0.5
    middle = ((t > 0.125) & (t < 0.375)).double().mean().item()
    assert middle == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.01)


def test_uniform_is_the_draw_runs_made_before_the_option():
    a = sample_time(64, 0.7, torch.Generator().manual_seed(3))
    b = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 0.7
    assert torch.equal(a, b)


def test_the_method_loss_draws_its_times_from_the_method_s_density():
    seen = []

    def model(x_t, t, y=None):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    x_1 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    for kwargs in ({}, {"time_sampling": "logit_normal", "time_loc": 1.0, "time_scale": 0.5}):
        make_method("otcfm", **kwargs).loss(model, x_1, generator=torch.Generator().manual_seed(0))
    uniform, logit = seen
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.02)
    # E[sigmoid(1 + 0.5 n)] = 0.71 (by quadrature below); the middle of the path, moved towards the data
    n = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    mean = torch.trapezoid(torch.sigmoid(1 + 0.5 * n) * torch.exp(-(n**2) / 2) / math.sqrt(2 * math.pi), n).item()
    assert logit.mean().item() == pytest.approx(mean, abs=0.01) and logit.std().item() < uniform.std().item()


def test_bad_time_sampling_is_refused_in_words():
    with pytest.raises(ValueError, match="unknown time sampling 'beta'; allowed: uniform, logit_normal"):
        TimeSampling("beta")
    with pytest.raises(ValueError, match="needs a finite loc and a scale > 0; got loc=0.0, scale=-1.0"):
        TimeSampling("logit_normal", 0.0, -1.0)
    with pytest.raises(ValueError, match="time sampling 'logit_normal' is for Euclidean methods; 'rfm' is riemannian"):
        make_method("rfm", manifold="sphere2", time_sampling="logit_normal")
