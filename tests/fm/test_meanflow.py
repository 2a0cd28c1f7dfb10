"""MeanFlow (Geng et al. 2025) in our convention (t = 0 noise, t = 1 data): the identity against a closed-form
average velocity, the JVP target against finite differences, r = t against CFM, and a trained one-step map against
the Gaussian it must reach."""

import math

import pytest
import torch
from torch import nn

from fm.losses import cfm_loss
from fm.meanflow import MeanFlowSettings, jump_sample, meanflow_loss, meanflow_target, sample_interval
from fm.methods import make_method
from fm.metrics import frechet_distance, gaussian_stats
from fm.models import MLP, UNet
from fm.paths import PathSample
from fm.training import fit

MU, SIGMA = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5  # N(0, I) -> N(MU, SIGMA^2 I)


def _s(t):
    """The marginal's standard deviation on the straight path between independent N(0, I) and N(MU, SIGMA^2 I)."""
    return torch.sqrt((1 - t) ** 2 + (t * SIGMA) ** 2)


class GaussianAverageVelocity(nn.Module):
    """The exact u(z, t, r) of that flow: its map is z_r = r MU + s(r) / s(t) (z - t MU), so u = (z_r - z) / (r - t),
    and at r = t the marginal velocity v = MU + s'(t) / s(t) (z - t MU)."""

    def forward(self, z, t, y=None, r=None):
        t, r = t[:, None], r[:, None]
        mean_t = t * MU
        ds = (-(1 - t) + t * SIGMA**2) / _s(t)
        v = MU + ds / _s(t) * (z - mean_t)
        gap = torch.where(r - t > 1e-9, r - t, torch.ones_like(t))
        jump = (r * MU + _s(r) / _s(t) * (z - mean_t) - z) / gap
        return torch.where(r - t > 1e-9, jump, v)


def test_the_identity_holds_with_a_plus_sign_for_the_exact_average_velocity():
    g = torch.Generator().manual_seed(0)
    model = GaussianAverageVelocity()
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9
    r = t + torch.rand(64, generator=g, dtype=torch.float64) * (1 - t)
    v = model(z, t, r=t)  # the marginal velocity
    u, target = meanflow_target(model, z, t, r, v)  # u = v + (r - t) du/dt along the flow
    torch.testing.assert_close(u, target, rtol=1e-9, atol=1e-9)
    # the paper's sign (u = v - (r - t) du/dt here) is wrong in this convention
    assert (u - (2 * v - target)).abs().max() > 1e-2
    # and one jump of the exact field is the exact flow map: N(0, I) lands on N(MU, SIGMA^2 I)
    x_0 = torch.randn(4, 2, generator=g, dtype=torch.float64)
    one = jump_sample(lambda x, tt, rr: model(x, tt, r=rr), x_0)
    assert one.nfe == 1
    torch.testing.assert_close(one.x_1, MU + SIGMA * x_0)


def test_the_jvp_target_equals_finite_differences():
    torch.manual_seed(0)
    model = MLP(2, 32, 2, two_times=True).double()
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.5
    r = t + 0.3
    u, target = meanflow_target(model, x_t, t, r, v)
    eps = 1e-6
    with torch.no_grad():
        du_dt = (model(x_t + eps * v, t + eps, r=r) - model(x_t - eps * v, t - eps, r=r)) / (2 * eps)
    torch.testing.assert_close(target, v + (r - t)[:, None] * du_dt, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(u, model(x_t, t, r=r))
    assert not target.requires_grad and u.requires_grad


def test_r_equal_t_is_cfm():
    torch.manual_seed(0)
    model = MLP(2, 32, 2, two_times=True)
    g = torch.Generator().manual_seed(2)
    x_0, x_1 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.rand(16, generator=g)
    x_t = (1 - t[:, None]) * x_0 + t[:, None] * x_1
    cfm = cfm_loss(lambda x, tt, y: model(x, tt, y, tt), PathSample(x_0, x_1, t, x_t, x_1 - x_0))
    plain = meanflow_loss(model, x_0, x_1, t, t, settings=MeanFlowSettings(adaptive_p=0.0))
    torch.testing.assert_close(plain, cfm)
    # the adaptive weight rescales each sample's CFM loss by 1 / (D * loss + c), held fixed in the gradient
    weighted = meanflow_loss(model, x_0, x_1, t, t)
    w = 1.0 / (2 * cfm.detach() + 1e-3)
    torch.testing.assert_close(weighted, w * cfm)
    grads = [torch.autograd.grad(loss.sum(), model.parameters(), retain_graph=True)[0] for loss in (weighted, w * cfm)]
    torch.testing.assert_close(grads[0], grads[1])


def test_intervals_are_ordered_mixed_and_repeatable():
    settings = MeanFlowSettings(ratio=0.25)
    t, r = sample_interval(20_000, torch.Generator().manual_seed(3), "cpu", settings)
    assert bool((t <= r).all()) and bool(((0 <= t) & (r <= 1)).all())
    assert abs((r != t).double().mean().item() - 0.25) < 0.01
    again = sample_interval(20_000, torch.Generator().manual_seed(3), "cpu", settings)
    assert torch.equal(t, again[0]) and torch.equal(r, again[1])


def _w2_to_target(x: torch.Tensor) -> float:
    """W2 between the Gaussian fitted to samples [N, 2] and N(MU, SIGMA^2 I) (the Fréchet distance is W2^2)."""
    mean, cov = gaussian_stats(x.double())
    return math.sqrt(max(frechet_distance(mean, cov, MU, SIGMA**2 * torch.eye(2, dtype=torch.float64)), 0.0))


def test_one_step_lands_on_the_target_gaussian():
    """Trained 1,500 steps (batch 256, an MLP 2-128x3 with smooth time features, time_scale 1; Adam 2e-3, EMA 0.99;
    the plain squared error, p = 0), one network call maps N(0, I) within W2 0.05 of N(MU, SIGMA^2 I) (measured
    0.015; two jumps 0.046). One Euler step of even the exact CFM velocity sends every sample to MU: W2 = SIGMA
    sqrt(2) = 0.71. (Measured on the same budget: the paper's adaptive weight p = 1 gives 0.12 at one step here, and
    the default time features, scale 1000, whose time derivative the JVP takes, 0.60.)"""
    method = make_method("meanflow", meanflow_p=0.0)
    model = MLP(2, 128, 3, two_times=True, time_scale=1.0)
    target = torch.distributions.Normal(MU.float(), SIGMA)

    def batch(g):
        return MU.float() + SIGMA * torch.randn(256, 2, generator=g), None

    ema, losses = fit(model, method, batch, steps=1500, lr=2e-3, ema_decay=0.99, seed=0)
    x_0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(9))
    fn = method.velocity(ema.module)
    one = method.sample(fn, x_0, "jump", 1)
    assert one.nfe == 1 and fn.calls == 1
    assert _w2_to_target(one.x_1) < 0.05, _w2_to_target(one.x_1)
    assert _w2_to_target(method.sample(fn, x_0, "jump", 2).x_1) < 0.1
    assert target.log_prob(one.x_1).mean() > target.log_prob(MU.float() + 2 * SIGMA * x_0).mean()


def test_what_it_is_not_is_refused_in_words():
    from fm.likelihood import LikelihoodSettings

    method = make_method("meanflow")
    model = MLP(2, 16, 1, two_times=True)
    with pytest.raises(
        ValueError,
        match=r"samples in jumps of its average velocity \(solver 'jump' with steps 1, "
        r"2, 4, \.\.\.\); 'dopri5' integrates a velocity field",
    ):
        method.sample(method.velocity(model), torch.zeros(2, 2), "dopri5")
    with pytest.raises(ValueError, match="not a velocity field, so it has no change of variables"):
        method.log_likelihood(method.velocity(model), torch.zeros(2, 2), LikelihoodSettings())
    with pytest.raises(ValueError, match="it has no SDE sampling"):
        method.sde_diffusion(1.0)
    with pytest.raises(ValueError, match="has no classifier-free guidance"):
        method.velocity(model, cfg_scale=2.0)
    with pytest.raises(ValueError, match="this model takes one time; build it with two_times=True"):
        MLP(2, 16, 1)(torch.zeros(2, 2), torch.zeros(2), None, torch.ones(2))
    with pytest.raises(ValueError, match="this model takes one time"):
        UNet(8, 1, 8, (1,), 1, (), 0.0, 1)(torch.zeros(1, 1, 8, 8), torch.zeros(1), None, torch.ones(1))
    with pytest.raises(ValueError, match="r >= t"):
        meanflow_loss(model, torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"ratio .* must be in \[0, 1\]"):
        MeanFlowSettings(ratio=1.5)


def test_two_time_models_read_the_interval_and_r_none_is_r_equal_t():
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.7])
    unet = UNet(8, 1, 8, (1, 2), 1, (), 0.0, 1, two_times=True)
    assert torch.equal(unet(x, t), unet(x, t, None, t))  # r = None means r = t
    mlp = MLP(2, 16, 2, two_times=True)
    z = torch.randn(2, 2)
    assert torch.equal(mlp(z, t), mlp(z, t, None, t))
    assert not torch.allclose(mlp(z, t, None, t), mlp(z, t, None, t + 0.2))
    # a one-time model builds no interval embedding: its parameters are those it had before the option
    torch.manual_seed(1)
    one = MLP(2, 16, 2)
    assert "interval_embed.mlp.0.weight" in mlp.state_dict() and not any("interval" in k for k in one.state_dict())
