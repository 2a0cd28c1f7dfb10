"""Post-hoc EMA (EDM2, Karras et al. 2024): power-function EMAs against their closed form, and the reconstruction of
other EMA lengths from snapshots against the directly computed averages."""

import math

import pytest
import torch
from torch import nn

from fm.ema import (
    SIGMA_REL_MAX,
    PowerEMA,
    combine_states,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    profile_fit_error,
    sigma_rel_to_gamma,
)


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    # EDM2 Sec. 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.001, 0.01, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    assert SIGMA_REL_MAX == pytest.approx(1 / math.sqrt(12))
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.5):
        with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\)"):
            sigma_rel_to_gamma(bad)


def _weights(n: int, gamma: float) -> torch.Tensor:
    """The closed form: after n updates, theta_i has weight ((i + 1)^(g + 1) - i^(g + 1)) / n^(g + 1)."""
    i = torch.arange(n, dtype=torch.float64)
    return ((i + 1) ** (gamma + 1) - i ** (gamma + 1)) / n ** (gamma + 1)


def _trajectory(n: int) -> torch.Tensor:
    """Known weights theta_i [n, 3]: a drift, an oscillation and a decay, as a training run's weights move."""
    i = torch.arange(n, dtype=torch.float64)[:, None]
    return torch.cat([i / n, torch.sin(i / 37.0), torch.exp(-i / 150.0)], dim=1)


class _Param(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def _run(n: int, sigma_rels, every: int):
    """Train-like updates theta_0 .. theta_{n-1}; snapshots (step, profiles) every `every` steps."""
    model, thetas = _Param(), _trajectory(n)
    ema = PowerEMA(model, sigma_rels)
    snapshots = []
    for step in range(1, n + 1):
        with torch.no_grad():
            model.theta.copy_(thetas[step - 1])
            model.count.fill_(step)
        ema.update(model)
        if step % every == 0:
            snapshots.append((step, [{k: v.clone() for k, v in m.state_dict().items()} for m in ema.modules]))
    return ema, snapshots, thetas


def test_a_power_ema_is_the_closed_form_average():
    n = 500
    ema, _, thetas = _run(n, (0.05, 0.2), every=n)
    for gamma, module in zip(ema.gammas, ema.modules, strict=True):
        w = _weights(n, gamma)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(module.theta.detach(), (w[:, None] * thetas).sum(0), rtol=1e-10, atol=1e-12)
        assert int(module.count) == n  # buffers copied, not averaged
    # the state round-trips, and another set of lengths is refused in words
    again = PowerEMA(_Param(), (0.05, 0.2))
    again.load_state_dict(ema.state_dict())
    assert again.num_updates == n and torch.equal(again.modules[1].theta, ema.modules[1].theta)
    with pytest.raises(ValueError, match=r"the saved power EMAs have sigma_rel \[0.05, 0.2\], this run \[0.1\]"):
        PowerEMA(_Param(), (0.1,)).load_state_dict(ema.state_dict())


def _flatten(snapshots):
    steps, gammas, states = [], [], []
    for step, profiles in snapshots:
        for gamma, state in zip([sigma_rel_to_gamma(s) for s in (0.05, 0.10)], profiles, strict=True):
            steps.append(step)
            gammas.append(gamma)
            states.append(state)
    return torch.tensor(steps, dtype=torch.float64), torch.tensor(gammas, dtype=torch.float64), states


def test_the_reconstruction_of_a_tracked_profile_is_that_profile():
    _, snapshots, _ = _run(400, (0.05, 0.10), every=40)
    steps, gammas, states = _flatten(snapshots)
    for k in (3, 10, len(states) - 1):  # a profile at one of its snapshots: that snapshot alone
        x = posthoc_coefficients(steps, gammas, float(steps[k]), float(gammas[k]))
        assert torch.argmax(x.abs()).item() == k and x[k].item() == pytest.approx(1.0, abs=1e-6)
        rebuilt = combine_states(states, x)
        torch.testing.assert_close(rebuilt["theta"], states[k]["theta"], rtol=0, atol=1e-6)
        assert int(rebuilt["count"]) == 400


@pytest.mark.parametrize("sigma_rel, step", [(0.07, 1000), (0.15, 1000), (0.03, 1000), (0.08, 600)])
def test_other_lengths_match_their_closed_form_average(sigma_rel, step):
    """Snapshots of sigma_rel 0.05 and 0.10 every 50 of 1,000 steps give other EMA lengths (and the run as it stood
    at an earlier step) within 0.2% of the weights' range (measured: 4e-5 to 9e-4) of the average computed directly
    from every weight, where the tracked profiles themselves are 2% to 28% away."""
    _, snapshots, thetas = _run(1000, (0.05, 0.10), every=50)
    steps, gammas, states = _flatten([s for s in snapshots if s[0] <= step])
    gamma = sigma_rel_to_gamma(sigma_rel)
    rebuilt = combine_states(states, posthoc_coefficients(steps, gammas, step, gamma))["theta"]
    direct = (_weights(step, gamma)[:, None] * thetas[:step]).sum(0)
    spread = thetas[:step].max(0).values - thetas[:step].min(0).values
    error = ((rebuilt - direct).abs() / spread).max().item()
    x = posthoc_coefficients(steps, gammas, step, gamma)
    assert profile_fit_error(steps, gammas, x, step, gamma) < 0.03  # the profile itself is fitted (0.002 to 0.026)
    assert error < 2e-3, (rebuilt, direct)
    tracked = min(((states[k]["theta"] - direct).abs() / spread).max().item() for k in (-2, -1))
    assert error < tracked / 10  # far closer than either tracked profile at that step


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least one sigma_rel"):
        PowerEMA(_Param(), ())
    with pytest.raises(ValueError, match="same length"):
        posthoc_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([1.0]), 2.0, 1.0)
    with pytest.raises(ValueError, match="2 coefficients for 1 states"):
        combine_states([{"a": torch.ones(1)}], torch.ones(2))


def test_several_targets_in_one_pass_equal_one_at_a_time():
    _, snapshots, _ = _run(300, (0.05, 0.10), every=30)
    steps, gammas, states = _flatten(snapshots)
    xs = torch.stack([posthoc_coefficients(steps, gammas, 300, sigma_rel_to_gamma(s)) for s in (0.04, 0.12)], 1)
    together = combine_states(iter(states), xs)  # an iterator: read once
    for k in range(2):
        assert torch.equal(together[k]["theta"], combine_states(states, xs[:, k])["theta"])
    # far outside the tracked lengths the fit says so
    far = sigma_rel_to_gamma(0.28)
    assert profile_fit_error(steps, gammas, posthoc_coefficients(steps, gammas, 300, far), 300, far) > 0.1
