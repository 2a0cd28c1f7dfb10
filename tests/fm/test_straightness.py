"""Straightness (Liu et al. 2022, Eq. 6) and chord deviation against flows whose trajectories are known."""

import math

import pytest
import torch

from fm.straightness import straightness


def _rotation(w: float):
    """dx/dt = w J x: circles about the origin at angular speed w."""
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    return lambda x, t: w * x @ J.T


def test_straight_constant_speed_paths_score_zero():
    x_0 = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = straightness(lambda x, t: shift.expand_as(x), x_0, steps=4)
    assert got.straightness.abs().max() < 1e-20 and got.chord_deviation.max() < 1e-12
    assert torch.allclose(got.chord_sq, shift.pow(2).mean().expand(64))
    assert got.nfe == 4 * 4 + 5


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_circular_arcs_match_the_closed_form(w):
    # x_t = R(w t) x_0: |v| = w r throughout and int v dt = the chord c, so S = (w^2 r^2 - |c|^2) / D with
    # |c|^2 = 2 r^2 (1 - cos w); the arc is farthest from its chord at its middle: r (1 - cos(w / 2)) over
    # |c| = 2 r sin(w / 2), i.e. tan(w / 4) / 2
    x_0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r2 = x_0.pow(2).sum(1)
    got = straightness(_rotation(w), x_0, steps=64)
    chord_sq = 2 * r2 * (1 - math.cos(w))
    assert torch.allclose(got.chord_sq, chord_sq / 2, rtol=1e-8)
    assert torch.allclose(got.straightness, (w**2 * r2 - chord_sq) / 2, rtol=1e-3)  # the trapezoid rule's error
    assert torch.allclose(
        got.chord_deviation, torch.full((32,), math.tan(w / 4) / 2, dtype=torch.float64), rtol=1e-3
    )  # the grid's nearest point to the arc's middle
    summary = got.summary()
    assert summary["straightness_relative"] == pytest.approx((w**2 / (2 * (1 - math.cos(w)))) - 1, rel=1e-3)


def test_the_same_paths_on_a_shorter_interval_score_the_same():
    # the VP path samples on [0, t_max]: twice the speed on half the time traces the same arcs
    x_0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = straightness(_rotation(1.0), x_0, steps=32)
    half = straightness(_rotation(2.0), x_0, steps=32, t_1=0.5)
    for a, b in ((whole.straightness, half.straightness), (whole.chord_deviation, half.chord_deviation)):
        assert torch.allclose(a, b, rtol=1e-10)


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="straightness needs steps >= 1; got 0"):
        straightness(_rotation(1.0), torch.zeros(2, 2), steps=0)
