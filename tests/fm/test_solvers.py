import pytest
import torch

from fm.models import MLP
from fm.paths import make_path
from fm.solvers import constant_diffusion, ode_sample, sde_sample, velocity_fn


def test_ode_sample_hits_the_gaussian_mean_and_std(gaussian_field):
    x_0 = torch.randn(20_000, 2, dtype=torch.float64)
    res = ode_sample(gaussian_field, x_0, solver="dopri5", atol=1e-7, rtol=1e-7)
    assert res.x_1.mean().item() == pytest.approx(1.5, abs=0.02)
    assert res.x_1.std().item() == pytest.approx(0.5, abs=0.01)
    assert res.nfe > 6


@pytest.mark.parametrize("solver,steps,per_step", [("euler", 7, 1), ("midpoint", 5, 2), ("rk4", 4, 4)])
def test_fixed_step_nfe_is_exact(gaussian_field, solver, steps, per_step):
    res = ode_sample(gaussian_field, torch.randn(8, 2, dtype=torch.float64), solver=solver, steps=steps)
    assert res.nfe == steps * per_step


def test_rk4_is_accurate_and_euler_converges(gaussian_field):
    x_0 = torch.randn(100, 2, dtype=torch.float64)
    # The exact flow of the linear field maps each x_0 to mu + S_1 / S_0 (x_0 - 0) = mu + s x_0.
    exact = 1.5 + 0.5 * x_0
    rk4 = ode_sample(gaussian_field, x_0, solver="rk4", steps=20).x_1
    assert (rk4 - exact).abs().max() < 1e-6
    err = [(ode_sample(gaussian_field, x_0, solver="euler", steps=n).x_1 - exact).abs().max() for n in (10, 20, 40)]
    assert err[0] > err[1] > err[2]
    assert err[1] / err[2] == pytest.approx(2.0, rel=0.15)  # first order


def test_sde_sampling_with_flow_score_keeps_the_marginals(gaussian_field):
    # Same marginals as the ODE for any diffusion g: the Fokker–Planck connection.
    path = make_path("ot", sigma_min=0.0)
    x_0 = torch.randn(20_000, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    res = sde_sample(gaussian_field, path, constant_diffusion(0.7), x_0, steps=500, t_1=0.999, generator=g)
    assert res.x_1.mean().item() == pytest.approx(1.5, abs=0.03)
    assert res.x_1.std().item() == pytest.approx(0.5, abs=0.03)
    assert res.nfe == 500


def test_cfg_scale_combines_conditional_and_null():
    model = MLP(dim=2, hidden=16, depth=1, num_classes=3).double()
    x, t, y = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    v_y, v_null = model(x, t, y), model(x, t, None)
    guided = velocity_fn(model, y, cfg_scale=3.0)(x, t)
    torch.testing.assert_close(guided, v_null + 3.0 * (v_y - v_null))
    torch.testing.assert_close(velocity_fn(model, y, cfg_scale=1.0)(x, t), v_y)


def test_bad_solver_input(gaussian_field):
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="unknown ODE method 'rk45'; allowed: dopri5"):
        ode_sample(gaussian_field, x, solver="rk45")
    with pytest.raises(ValueError, match="fixed-step method 'euler' needs steps"):
        ode_sample(gaussian_field, x, solver="euler")
    with pytest.raises(ValueError, match=r"needs steps \(an integer >= 1\); got 0"):
        ode_sample(gaussian_field, x, solver="euler", steps=0)
    with pytest.raises(ValueError, match="needs class labels y"):
        velocity_fn(MLP(num_classes=2), None, cfg_scale=2.0)


def test_nfe_is_what_a_plain_torchdiffeq_solve_counts():
    from torchdiffeq import odeint

    torch.manual_seed(3)
    model = MLP(dim=2, hidden=32, depth=2).double().eval()
    for p in model.parameters():  # a fresh MLP predicts 0; give it a nonlinear field
        torch.nn.init.normal_(p, std=0.5)
    x_0 = torch.randn(64, 2, dtype=torch.float64)
    calls = 0

    def plain(t, x):
        nonlocal calls
        calls += 1
        return model(x, t.expand(x.shape[0]))

    with torch.no_grad():
        ref = odeint(plain, x_0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5", atol=1e-5, rtol=1e-5)[
            -1
        ]
    res = ode_sample(model, x_0, "dopri5", atol=1e-5, rtol=1e-5)
    assert res.nfe == calls
    torch.testing.assert_close(res.x_1, ref, rtol=0, atol=0)


def test_an_autocast_field_keeps_the_solver_in_fp32_and_stays_close():
    """sample.precision=bf16: the network runs under bf16 autocast, the ODE state and output stay fp32, and the
    samples stay within bf16's rounding of the fp32 solve."""
    from fm.solvers import autocast_field, ode_sample

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))

    def fn(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    seen = []

    def spy(x, t):
        out = fn(x, t)
        seen.append(out.dtype)
        return out

    x_0 = torch.randn(16, 2)
    ref = ode_sample(fn, x_0, "rk4", steps=20)
    low = ode_sample(autocast_field(spy, torch.bfloat16, "cpu"), x_0, "rk4", steps=20)
    assert low.x_1.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    assert 0 < (low.x_1 - ref.x_1).abs().max() < 0.05
    assert autocast_field(fn, None, "cpu") is fn


def test_sample_precision_is_checked_before_ray():
    from pipelines.batch.config import SampleConfig, validate_sample_config
    from pipelines.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^sample.precision: 'fp16' is not allowed; fp16 needs GPU actors"):
        validate_sample_config(SampleConfig(precision="fp16"))
    with pytest.raises(ConfigError, match=r"^sample.precision: 'auto' is not allowed; allowed: fp32, bf16, fp16$"):
        validate_sample_config(SampleConfig(precision="auto"))
    validate_sample_config(SampleConfig(precision="bf16"))
