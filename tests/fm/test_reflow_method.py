"""The reflow method (Rectified Flow, Liu et al. 2022): it trains on given pairs, keeps them as they are, and its
target is the straight line between them."""

import pytest
import torch

from fm.methods import make_method
from fm.training import given_pair_step, pair_step


def test_given_pairs_are_kept_and_the_target_is_their_difference():
    method = make_method("reflow")
    g = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    pairs = given_pair_step(method, x_0, x_1, None, torch.Generator().manual_seed(1))
    assert torch.equal(pairs.x_0, x_0) and torch.equal(pairs.x_1, x_1) and pairs.solve_seconds == 0.0
    seen = {}

    def exact(x_t, t, y=None):  # the true velocity of the straight path between the given pairs
        seen["x_t"], seen["t"] = x_t, t
        return x_1 - x_0

    zero = method.loss_on_pairs(exact, pairs.x_0, pairs.x_1, None, pairs.generator)
    assert torch.equal(zero, torch.zeros(8))
    t = seen["t"].view(-1, 1)
    assert torch.allclose(seen["x_t"], (1 - t) * x_0 + t * x_1, atol=1e-6)  # sigma 0: on the line itself
    loss = method.loss_on_pairs(
        lambda x_t, t, y=None: torch.zeros_like(x_t), x_0, x_1, None, torch.Generator().manual_seed(2)
    )
    assert torch.allclose(loss, (x_1 - x_0).pow(2).mean(1))


def test_reflow_draws_no_noise_and_the_others_take_no_given_pairs():
    x_1 = torch.randn(4, 2)
    with pytest.raises(
        ValueError,
        match=r"method 'reflow' trains on given pairs \(x_0, x_1\): its x_0 comes with "
        r"each row of a pairs source",
    ):
        make_method("reflow").loss(lambda x, t, y=None: x, x_1, generator=torch.Generator())
    with pytest.raises(ValueError, match="method 'otcfm' pairs its own noise; given pairs are for reflow"):
        given_pair_step(make_method("otcfm"), torch.randn(4, 2), x_1, None, torch.Generator())
    pair_step(make_method("otcfm"), x_1, None, torch.Generator().manual_seed(0))  # unchanged for the others
