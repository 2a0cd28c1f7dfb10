"""Action Matching from snapshots: the pairing, the loss's analytic value at the true action, and transport learned
from unpaired snapshots of a pure translation and of an Ornstein-Uhlenbeck process."""

import math

import pytest
import torch
from torch import nn

from fm.action_matching import action_matching_loss, action_velocity, snapshot_pairs, transport
from fm.couplings import ExactOTCoupling
from fm.dynamics import OBSERVED_TIMES, get_dynamics, snapshots
from fm.methods import make_method
from fm.models import MLP

G = torch.Generator
TIMES = torch.tensor(OBSERVED_TIMES)


class LinearAction(nn.Module):
    """s(x, t) = scale c . x + f(t), f(t) = t^2: velocity scale c; f cancels from the loss in expectation."""

    def __init__(self, c, scale=1.0):
        super().__init__()
        self.c, self.scale = torch.tensor(c), scale

    def forward(self, x, t, y=None):
        return (self.scale * x @ self.c + t**2)[:, None]


def test_snapshot_pairs_join_consecutive_snapshots():
    x, k = snapshots("rotating-gmm", 40, generator=G().manual_seed(0))
    a, b, seg = snapshot_pairs(x, k, 5, G().manual_seed(1))
    assert len(a) == 4 * 40 and sorted(seg.unique().tolist()) == [0, 1, 2, 3]
    # each a is a row of snapshot seg, each b a row of snapshot seg + 1
    rows = {tuple(r.tolist()): int(i) for r, i in zip(x, k, strict=True)}
    assert all(
        rows[tuple(p.tolist())] == s and rows[tuple(q.tolist())] == s + 1
        for p, q, s in zip(a, b, seg.tolist(), strict=True)
    )
    with pytest.raises(ValueError, match=r"snapshot indices must lie in 0..4; got 0..5"):
        snapshot_pairs(x, torch.cat([k[:-1], torch.tensor([5])]), 5)
    with pytest.raises(ValueError, match="no pair of consecutive snapshots"):
        snapshot_pairs(x[k == 0], k[k == 0], 5)


def test_exact_ot_pairs_of_unequal_snapshots_use_every_row_uniformly():
    # 45 rows at t_k, 55 at t_k+1: 55 pairs drawn from the plan between uniform marginals (systematic resampling);
    # every row of either time is used in proportion to its mass (keeping each row's largest partner in that plan
    # leaves ~18% of the 55 unused, always the same ones)
    x = torch.randn(100, 2, generator=G().manual_seed(0))
    k = torch.cat([torch.zeros(45, dtype=torch.long), torch.ones(55, dtype=torch.long)])
    used_a, used_b, draws = torch.zeros(45), torch.zeros(55), 400
    for s in range(draws):
        a, b, seg = snapshot_pairs(x, k, 2, G().manual_seed(s), ExactOTCoupling())
        assert len(a) == 55 and (seg == 0).all()
        used_a += (a[:, None, :] == x[None, :45]).all(-1).sum(0)
        used_b += (b[:, None, :] == x[None, 45:]).all(-1).sum(0)
    # each row in proportion to its mass: a row of t_k+1 in one of 55 pairs per draw, a row of t_k in 55/45, on
    # average; rows of t_k are contiguous in the plan's order, so each gets 1 or 2 pairs in every draw
    assert used_a.min() >= draws and used_a.max() <= 2 * draws
    for used, expected in [(used_a, draws * 55 / 45), (used_b, draws)]:
        assert used.min() > 0 and ((used - expected).abs() < 0.1 * expected).all(), (used.min(), used.max())
    # each pair is a pair of the optimal plan: its cost is the plan's, on average over draws
    from fm.couplings import squared_cost

    cost = squared_cost(x[:45], x[45:])
    a, b, _ = snapshot_pairs(x, k, 2, G().manual_seed(0), ExactOTCoupling())
    independent = cost.mean().item()
    assert ((a - b) ** 2).sum(1).mean().item() < 0.5 * independent


def test_action_velocity_is_the_gradient_of_the_action():
    # s(x, t) = t |x|^2 / 2 + sin(x_0) x_1: grad s = (t x_0 + cos(x_0) x_1, t x_1 + sin(x_0))
    class Action(nn.Module):
        def forward(self, x, t, y=None):
            return (t * (x**2).sum(1) / 2 + torch.sin(x[:, 0]) * x[:, 1])[:, None]

    x, t = torch.randn(16, 2, generator=G().manual_seed(0), dtype=torch.float64), torch.rand(16, dtype=torch.float64)
    want = torch.stack([t * x[:, 0] + torch.cos(x[:, 0]) * x[:, 1], t * x[:, 1] + torch.sin(x[:, 0])], 1)
    with torch.no_grad():  # as a sampler calls it
        got = action_velocity(Action())(x, t)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_action_matching_loss_is_minus_the_kinetic_energy_at_the_true_action():
    """Snapshots of one cloud shifted by c t: exact OT pairs each point with its own shift, so for
    s = scale c . x + t^2 a pair's loss is Delta |c|^2 (scale^2 / 2 - scale) up to the t^2 term's zero-mean noise:
    -Delta |c|^2 / 2 at the truth (scale 1), and more for any other scale."""
    c = [2.0, 1.0]
    cloud = torch.randn(400, 2, generator=G().manual_seed(0))
    x = torch.cat([cloud + t * torch.tensor(c) for t in OBSERVED_TIMES])
    k = torch.arange(5).repeat_interleave(400)
    a, b, seg = snapshot_pairs(x, k, 5, G().manual_seed(1), ExactOTCoupling())
    torch.testing.assert_close(b - a, 0.25 * torch.tensor(c).expand_as(a), atol=1e-5, rtol=0)
    energy = 0.25 * 5.0  # Delta |c|^2
    for scale in (1.0, 0.5, 1.5):
        loss = action_matching_loss(LinearAction(c, scale), a, b, seg, TIMES, G().manual_seed(2))
        assert loss.mean().item() == pytest.approx(energy * (scale**2 / 2 - scale), abs=0.01)
        # without the time term the loss is exact for every pair
    assert loss.std().item() < 0.2


def _fit(method_name, name, steps=1200, seed=0):
    torch.manual_seed(seed)
    method = make_method(method_name, times=list(OBSERVED_TIMES))
    action = method.prediction == "action"
    model = MLP(2, 64, 2, out_dim=1 if action else None, time_scale=1.0 if action else 1000.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    # the learning rate decays to 0: what is checked is the field the loss defines, not the last steps' noise
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x, k = snapshots(name, 2000, generator=G().manual_seed(seed))
    g = G().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(len(x), (256,), generator=g)
        loss = method.loss(model, x[idx], k[idx], g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return method, model


def test_action_matching_learns_a_pure_translation():
    method, model = _fit("am", "translation")
    dyn = get_dynamics("translation")
    x_0 = dyn.sample(0.0, 500, G().manual_seed(9))
    with torch.no_grad():
        path, nfe = transport(method.velocity(model), x_0, OBSERVED_TIMES, "rk4", steps=10)
    assert nfe == 4 * 10 * 4
    for t, x_t in zip(OBSERVED_TIMES, path, strict=True):
        # every point moves by c t, whatever its position (a gradient field: s = c . x)
        err = (x_t - x_0 - t * torch.tensor([2.0, 1.0])).norm(dim=1)
        # within 0.15 of the displacement |c| t <= 2.24: batches hold unequal counts of the times, so the OT pairs
        # split rows (fm.couplings.ExactOTCoupling), which adds noise to the pairs' displacement
        assert err.mean().item() < 0.15, (t, err.mean().item())


def test_action_matching_learns_the_ou_marginals():
    """OU from N(m_0, v_0 I): the learned flow must carry the held-out first snapshot to N(m_t, v_t I) at every
    observed time, m_t = m_0 e^{-2t}, v_t = 1/4 + (v_0 - 1/4) e^{-4t} (mean and per-axis std; 2,000 points give
    a standard error of about 0.01 on each)."""
    method, model = _fit("am", "ou", steps=3000)
    dyn = get_dynamics("ou")
    x_0 = dyn.sample(0.0, 2000, G().manual_seed(9))
    with torch.no_grad():
        path, _ = transport(method.velocity(model), x_0, OBSERVED_TIMES, "rk4", steps=10)
    m_0 = torch.tensor([2.0, -1.0])
    for t, x_t in zip(OBSERVED_TIMES[1:], path[1:], strict=True):
        m_t, s_t = m_0 * math.exp(-2 * t), dyn.std(t)
        assert (x_t.mean(0) - m_t).abs().max().item() < 0.06, (t, x_t.mean(0), m_t)
        assert (x_t.std(0) / s_t - 1).abs().max().item() < 0.08, (t, x_t.std(0), s_t)


def test_snapshot_methods_check_their_data():
    with pytest.raises(ValueError, match="'am' needs snapshot data with observation times"):
        make_method("am")
    with pytest.raises(ValueError, match=r"needs at least two increasing observation times; got \[0.5, 0.5\]"):
        make_method("am", times=[0.5, 0.5])
    with pytest.raises(ValueError, match="snapshot data need a snapshot method"):
        make_method("fm_ot", times=[0.0, 1.0])
    method = make_method("snapshot_icfm", times=[0.0, 1.0])
    with pytest.raises(ValueError, match="needs each row's snapshot index as its label"):
        method.loss(MLP(2, 8, 1), torch.randn(4, 2))
    with pytest.raises(ValueError, match="starts from data of the first snapshot"):
        method.draw_x0(None, [2])
    model = MLP(2, 8, 1, out_dim=1)
    v = action_velocity(model)(torch.randn(5, 2), torch.rand(5))
    assert v.shape == (5, 2)
