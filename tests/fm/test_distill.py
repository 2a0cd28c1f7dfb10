"""One-step distillation (Liu et al. 2022, Sec. 2.3): on a flow's own pairs (x_0, x_1), v(x_0, 0) regresses x_1 - x_0,
and the sample is the one jump x_0 + v(x_0, 0)."""

import pytest
import torch

from fm.losses import cfm_loss
from fm.methods import JUMP, DistillMethod, make_method
from fm.models import build_model
from fm.training import given_pair_step


def test_the_loss_is_the_displacement_at_t_0_and_draws_nothing():
    method = make_method("distill")
    assert isinstance(method, DistillMethod) and method.pairs_given
    g = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    seen = {}

    def field(x_t, t, y=None):
        seen["x_t"], seen["t"] = x_t, t
        return 0.5 * x_t

    gen = torch.Generator().manual_seed(1)
    before = gen.get_state()
    loss = method.loss_on_pairs(field, x_0, x_1, None, gen)
    assert torch.equal(seen["t"], torch.zeros(8)) and torch.equal(seen["x_t"], x_0)  # the path's start, every time
    assert torch.allclose(loss, (0.5 * x_0 - (x_1 - x_0)).pow(2).mean(1))
    assert torch.equal(gen.get_state(), before)  # no time drawn: the step's stream is untouched
    pairs = given_pair_step(method, x_0, x_1, None, torch.Generator().manual_seed(2))
    assert torch.equal(pairs.x_0, x_0) and torch.equal(pairs.x_1, x_1)  # the given pairs, kept


def test_a_trained_one_step_map_lands_on_the_pairs_end_points():
    """Pairs of a linear flow's end map, x_1 = A x_0 + b (as the ODE of a Gaussian-to-Gaussian flow gives): after
    400 Adam steps of batch 256, the one jump from fresh noise lands within 1e-3 of A x_0 + b (mean squared error;
    measured 9e-6, against a displacement of mean square 5.6)."""
    torch.manual_seed(0)
    a = torch.tensor([[1.5, 0.3], [-0.2, 0.6]])
    b = torch.tensor([2.0, -1.0])
    method = make_method("distill")
    model = build_model("mlp", dim=2, hidden=64, depth=2, time_scale=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        x_0 = torch.randn(256, 2, generator=g)
        loss = method.loss_on_pairs(model, x_0, x_0 @ a.T + b, None, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        res = method.sample(method.velocity(model), x_0, JUMP, 1)
    target = x_0 @ a.T + b
    assert res.nfe == 1
    assert (target - x_0).pow(2).sum(1).mean() > 5
    assert (res.x_1 - target).pow(2).sum(1).mean() < 1e-3
    # the same as the straight path's CFM loss with every t = 0
    t = torch.zeros(len(x_0))
    direct = cfm_loss(model, make_method("reflow").path.sample(x_0, target, t), None)
    assert torch.allclose(method.loss_on_pairs(model, x_0, target, None, None), direct)


def test_only_one_jump_and_no_likelihood_or_score():
    method = make_method("distill")
    field = method.velocity(build_model("mlp", dim=2, hidden=8, depth=1))
    x_0 = torch.randn(4, 2)
    for solver, steps in (("euler", 1), ("dopri5", None), (JUMP, 2)):
        with pytest.raises(ValueError, match=r"method 'distill' is a one-step map fit at t = 0: it samples in one"):
            method.sample(field, x_0, solver, steps)
    with pytest.raises(ValueError, match=r"method 'distill' is a one-step map, not a velocity field, so it has no"):
        method.log_likelihood(field, x_0, None, None)
    with pytest.raises(ValueError, match=r"method 'distill' is a one-step map, not a score: it has no SDE sampling"):
        method.sde_diffusion(1.0)
    with pytest.raises(ValueError, match=r"method 'distill' trains at t = 0 only: it draws no times"):
        make_method("distill", time_sampling="logit_normal")
