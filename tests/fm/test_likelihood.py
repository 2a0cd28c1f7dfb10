import math

import pytest
import torch
from torch import nn

from fm.likelihood import (
    LikelihoodSettings,
    bits_per_dim,
    divergence_exact,
    divergence_hutchinson,
    log_likelihood,
    make_probes,
)


def test_log_likelihood_matches_closed_form(gaussian_field):
    x_1 = 1.5 + 0.5 * torch.randn(64, 3, dtype=torch.float64)
    res = log_likelihood(gaussian_field, x_1, LikelihoodSettings("exact", atol=1e-8, rtol=1e-8))
    torch.testing.assert_close(res.log_p, gaussian_field.log_prob_data(x_1), atol=1e-3, rtol=0)
    # the noise end is the inverse flow: x_0 = (x_1 - mu) / s
    torch.testing.assert_close(res.x_0, (x_1 - 1.5) / 0.5, atol=1e-4, rtol=0)


def test_log_likelihood_on_images_with_hutchinson(gaussian_field):
    x_1 = 1.5 + 0.5 * torch.randn(16, 1, 4, 4, dtype=torch.float64)
    res = log_likelihood(gaussian_field, x_1, LikelihoodSettings("hutchinson", 1, atol=1e-8, rtol=1e-8))
    # the Jacobian is diagonal and constant per dimension, so a Rademacher probe is exact
    torch.testing.assert_close(res.log_p, gaussian_field.log_prob_data(x_1), atol=1e-3, rtol=0)


def test_exact_divergence_is_the_jacobian_trace():
    a = torch.randn(12, 12, dtype=torch.float64)

    def fn(x, t):
        return torch.tanh(x.flatten(1) @ a.T).reshape(x.shape) * (1 + t.reshape(-1, 1, 1, 1))

    x, t = torch.randn(3, 3, 2, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    _, div = divergence_exact(fn, x, t, chunk=5)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda z, b=b: fn(z[None], t[b : b + 1])[0], x[b])
        assert div[b].item() == pytest.approx(jac.reshape(12, 12).trace().item(), rel=1e-10)


class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x, t):
        return self.net(x) * (1 + t.reshape(-1, 1, 1, 1))


def test_exact_and_hutchinson_agree_on_images():
    fn = SmallConv().double()
    x, t = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    _, exact = divergence_exact(fn, x, t)
    probes = make_probes(x, 20_000, "gaussian", torch.Generator().manual_seed(0))
    _, est = divergence_hutchinson(fn, x, t, probes)
    torch.testing.assert_close(est, exact, atol=0.05 * exact.abs().max().item(), rtol=0)


def test_bits_per_dim_of_a_known_density(gaussian_field):
    # The model-space density is N(mu, S^2 I) per dimension, so the probability of each dequantization cell
    # [(x) / 127.5 - 1, (x + 1) / 127.5 - 1) is a product of normal CDF differences: the exact discrete bpd.
    d = 4
    x_uint8 = torch.randint(100, 156, (8, 1, 2, 2)).double()
    normal = torch.distributions.Normal(gaussian_field.mu, gaussian_field.std)
    lo, hi = x_uint8 / 127.5 - 1, (x_uint8 + 1) / 127.5 - 1
    exact = -torch.log(normal.cdf(hi) - normal.cdf(lo)).flatten(1).sum(1) / (d * math.log(2))
    res = bits_per_dim(
        gaussian_field,
        x_uint8,
        draws=64,
        generator=torch.Generator().manual_seed(0),
        settings=LikelihoodSettings(atol=1e-8, rtol=1e-8),
    )
    assert res.bpd.shape == (8,) and res.draws == 64 and res.nfe > 0
    torch.testing.assert_close(res.bpd, exact, atol=2e-3, rtol=0)
    assert res.mean == pytest.approx(res.bpd.mean().item())
    assert res.stderr == pytest.approx(res.bpd.std().item() / math.sqrt(8))
    # one draw is a variational bound: on average it is above the exact value
    one = bits_per_dim(
        gaussian_field,
        x_uint8,
        draws=1,
        generator=torch.Generator().manual_seed(1),
        settings=LikelihoodSettings(atol=1e-8, rtol=1e-8),
    )
    assert one.mean > exact.mean().item()


def test_bad_likelihood_input(gaussian_field):
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match="number of Hutchinson probes K must be >= 1; got 0"):
        log_likelihood(gaussian_field, x, LikelihoodSettings("hutchinson", num_probes=0))
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        log_likelihood(gaussian_field, x, LikelihoodSettings("trace"))
    with pytest.raises(ValueError, match="dequantization draws K must be >= 1"):
        bits_per_dim(gaussian_field, torch.zeros(2, 4), draws=0)
    with pytest.raises(ValueError, match=r"8-bit values in \[0, 255\]"):
        bits_per_dim(gaussian_field, torch.full((2, 4), 300.0))


def test_several_dequantization_draws_need_the_exact_divergence(gaussian_field):
    # log-mean-exp of noisy unbiased estimates is biased upward (Jensen): with Hutchinson divergences K > 1 draws
    # would report bits/dim below the bound, so they are refused, in fm and in the evaluation config
    x = torch.randint(100, 156, (4, 1, 2, 2)).double()
    with pytest.raises(ValueError, match="K=4 dequantization draws need the exact divergence"):
        bits_per_dim(gaussian_field, x, draws=4, settings=LikelihoodSettings("hutchinson"))
    from pipelines.batch.config import EvalConfig, validate_eval_config
    from pipelines.core.errors import ConfigError

    with pytest.raises(
        ConfigError, match="eval.draws: 4 is not allowed; K > 1 dequantization draws need eval.divergence=exact"
    ):
        validate_eval_config(EvalConfig(draws=4, divergence="hutchinson"))
    validate_eval_config(EvalConfig(draws=4, divergence="exact"))
    # the bias being refused: with one Gaussian probe, the log-mean-exp over draws of the same x exceeds the exact value
    settings = LikelihoodSettings("hutchinson", probe_kind="gaussian", atol=1e-7, rtol=1e-7)  # (Rademacher probes
    # are exact on this field's diagonal Jacobian)
    exact = log_likelihood(
        gaussian_field, x[:1].repeat(256, 1, 1, 1) / 127.5 - 1, LikelihoodSettings(atol=1e-7, rtol=1e-7)
    ).log_p[0]
    noisy = log_likelihood(
        gaussian_field, x[:1].repeat(256, 1, 1, 1) / 127.5 - 1, settings, torch.Generator().manual_seed(0)
    ).log_p
    assert torch.logsumexp(noisy, 0) - math.log(256) > exact + 0.01


def test_per_row_generators_make_a_rows_bits_per_dim_independent_of_its_batch(gaussian_field):
    from fm.seeding import SeedStack

    x = torch.randint(0, 256, (6, 1, 3, 3)).float()
    settings = LikelihoodSettings("hutchinson", num_probes=2, solver="rk4", steps=8)  # fixed steps: no shared step size
    full = bits_per_dim(gaussian_field, x, generator=SeedStack(range(10, 16)), settings=settings).bpd
    part = bits_per_dim(gaussian_field, x[2:5], generator=SeedStack(range(12, 15)), settings=settings).bpd
    torch.testing.assert_close(part, full[2:5], rtol=1e-6, atol=1e-6)
    other = bits_per_dim(gaussian_field, x, generator=SeedStack(range(20, 26)), settings=settings).bpd
    assert not torch.allclose(other, full)  # the seeds are what the noise comes from
