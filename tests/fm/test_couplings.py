import ot
import pytest
import torch

from fm.couplings import (
    EntropicOTCoupling,
    ExactOTCoupling,
    GlobalOTCoupling,
    IndependentCoupling,
    make_coupling,
    squared_cost,
)


def _cost(x_0, x_1):
    return (x_0 - x_1).flatten(1).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("shape", [(64, 2), (32, 1, 8, 8), (16, 3, 4, 4)])
def test_exact_ot_never_costs_more_than_independent(shape):
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x_0, x_1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g) + 1.0
        ind_0, ind_1, _ = IndependentCoupling()(x_0, x_1)
        ot_0, ot_1, _ = ExactOTCoupling()(x_0, x_1)
        assert _cost(ot_0, ot_1) <= _cost(ind_0, ind_1) + 1e-6
        # the plan is a permutation: every data point is used exactly once
        assert torch.equal(ot_1.flatten(1).sort(0).values, x_1.flatten(1).sort(0).values)


def test_exact_ot_pairs_a_set_with_itself_as_identity():
    x = torch.randn(50, 1, 4, 4)
    _, j = ExactOTCoupling().plan_indices(x, x)
    assert torch.equal(j, torch.arange(50))


def test_exact_ot_matches_brute_force_on_small_sets():
    import itertools

    x_0, x_1 = torch.randn(6, 3), torch.randn(6, 3)
    cost = squared_cost(x_0, x_1)
    best = min(sum(cost[i, p[i]].item() for i in range(6)) for p in itertools.permutations(range(6)))
    _, j = ExactOTCoupling().plan_indices(x_0, x_1)
    assert sum(cost[i, j[i]].item() for i in range(6)) == pytest.approx(best, rel=1e-9)


def test_labels_follow_their_data():
    x_0, x_1 = torch.randn(20, 2), torch.randn(20, 2)
    y = torch.arange(20)
    for coupling in (ExactOTCoupling(), EntropicOTCoupling(0.5, torch.Generator().manual_seed(0))):
        _, p_1, p_y = coupling(x_0, x_1, y)
        torch.testing.assert_close(p_1, x_1[p_y])


def test_entropic_ot_tends_to_exact_ot_and_to_independent():
    g = torch.Generator().manual_seed(1)
    x_0, x_1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 2
    exact = _cost(*ExactOTCoupling()(x_0, x_1)[:2])
    small = _cost(*EntropicOTCoupling(0.01, torch.Generator().manual_seed(0))(x_0, x_1)[:2])
    large = _cost(*EntropicOTCoupling(1e4, torch.Generator().manual_seed(0))(x_0, x_1)[:2])
    indep = torch.cdist(x_0, x_1).pow(2).mean().item()
    assert small == pytest.approx(exact, rel=0.1)
    assert large == pytest.approx(indep, rel=0.2)
    assert small < large


def test_global_ot_without_process_group_is_local_ot():
    x_0, x_1 = torch.randn(10, 2), torch.randn(10, 2)
    a = GlobalOTCoupling()(x_0, x_1)
    b = ExactOTCoupling()(x_0, x_1)
    torch.testing.assert_close(a[1], b[1])


def test_bad_input():
    allowed = "independent, exact_ot, entropic_ot, global_ot"
    with pytest.raises(ValueError, match=f"unknown coupling 'ot'; allowed: {allowed}"):
        make_coupling("ot")
    with pytest.raises(ValueError, match="x_0 and x_1 must have the same shape"):
        ExactOTCoupling()(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="reg must be > 0"):
        EntropicOTCoupling(0.0)


# the last case runs in the log domain (cost / reg beyond the kernel's range), where convergence is slower
@pytest.mark.parametrize("reg, dim, tol", [(0.5, 2, 1e-8), (2.0, 2, 1e-8), (0.5, 16, 1e-6)])
def test_sinkhorn_log_converges_to_pots_plan(reg, dim, tol):
    from fm.couplings import _KERNEL_RANGE, sinkhorn_log

    g = torch.Generator().manual_seed(3)
    x_0, x_1 = torch.randn(128, dim, generator=g), torch.rand(128, dim, generator=g) * 4 - 2
    cost = squared_cost(x_0, x_1)
    assert ((cost.max() - cost.min()) / reg < _KERNEL_RANGE) == (dim == 2)
    log_plan, iterations, err = sinkhorn_log(cost, reg, tol=tol, max_iter=20_000)
    pot = ot.sinkhorn(
        ot.unif(128), ot.unif(128), cost.numpy(), reg=reg, method="sinkhorn_log", stopThr=tol / 100, numItermax=100_000
    )
    plan = log_plan.exp()
    assert err < tol and iterations < 20_000
    # the plan's entries are about 1/128^2 = 6e-5; a marginal error tol moves them by at most about tol
    assert (plan - torch.from_numpy(pot)).abs().max().item() < tol
    torch.testing.assert_close(plan.sum(0), torch.full((128,), 1 / 128, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (plan.sum(1) - 1 / 128).abs().sum().item() < tol


def test_sinkhorn_stops_on_its_tolerance_not_an_iteration_count():
    from fm.couplings import sinkhorn_log

    g = torch.Generator().manual_seed(4)
    cost = squared_cost(torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g))
    _, loose, err_loose = sinkhorn_log(cost, 0.5, tol=1e-3)
    _, tight, err_tight = sinkhorn_log(cost, 0.5, tol=1e-9)
    assert loose < tight and err_loose < 1e-3 and err_tight < 1e-9
    _, capped, err_capped = sinkhorn_log(cost, 0.5, tol=1e-12, max_iter=7)
    assert capped == 7 and err_capped > 1e-12  # the caller sees that it stopped short
