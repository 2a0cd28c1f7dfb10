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


def test_the_edm_grid_is_karras_noise_levels_as_times_and_uniform_is_unchanged():
    from fm.solvers import time_grid

    # uniform: exactly the grid it always was (samples and published figures stay bit for bit)
    assert torch.equal(time_grid(7, 0.0, 0.99), torch.linspace(0.0, 0.99, 8))
    steps, rho, s_max, s_min = 6, 7.0, 80.0, 0.002
    sigma = [
        (s_max ** (1 / rho) + i / (steps - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(6)
    ]
    expected = [0.0, *(1 / (1 + s) for s in sigma[1:]), 1.0]  # t where (1 - t) / t = sigma_i; first 1/81 -> 0
    got = time_grid(steps, grid="edm").double()
    assert got.tolist() == pytest.approx(expected, abs=1e-7)
    assert (got.diff() > 0).all()
    # the second-to-last time is sigma_min's: 1 / 1.002
    assert got[-2].item() == pytest.approx(1 / 1.002, abs=1e-7)
    # mapped onto [t_0, t_1]; one step is the interval on every grid
    assert time_grid(6, 0.0, 0.5, grid="edm").tolist() == pytest.approx([0.5 * v for v in expected], abs=1e-7)
    assert time_grid(1, grid="edm").tolist() == [0.0, 1.0]


def test_fixed_steps_on_the_edm_grid_integrate_exactly_where_the_solver_is_exact():
    from fm.meanflow import jump_sample

    x_0 = torch.zeros(4, 1, dtype=torch.float64)
    # rk4 is exact for a cubic in t on any grid: x(1) = int_0^1 4 t^3 dt = 1
    cubic = ode_sample(lambda x, t: 4 * t[:, None] ** 3, x_0, "rk4", 5, grid="edm")
    assert cubic.x_1.flatten().tolist() == pytest.approx([1.0] * 4, abs=1e-12) and cubic.nfe == 20
    # euler on the edm grid of a field v = 2 t: the left Riemann sum over that grid
    from fm.solvers import time_grid

    ts = time_grid(4, grid="edm").double()
    euler = ode_sample(lambda x, t: 2 * t[:, None], x_0, "euler", 4, grid="edm").x_1[0, 0].item()
    assert euler == pytest.approx(sum(2 * ts[k].item() * (ts[k + 1] - ts[k]).item() for k in range(4)), rel=1e-6)
    # MeanFlow's jumps over the grid: an average velocity u(x, t, r) = t + r is summed as (r - t)(t + r) = r^2 - t^2
    jumped = jump_sample(lambda x, t, r: (t + r)[:, None].to(x.dtype), x_0, 3, "edm").x_1
    assert jumped.flatten().tolist() == pytest.approx([1.0] * 4, abs=1e-6)


@pytest.mark.parametrize(
    "solver, steps, grid, message",
    [
        ("dopri5", None, "edm", "time grid 'edm' places fixed steps; the adaptive solver 'dopri5' chooses its own"),
        ("euler", 4, "cosine", "unknown time grid 'cosine'; allowed: uniform, edm"),
    ],
)
def test_a_time_grid_a_solver_cannot_take_is_refused(gaussian_field, solver, steps, grid, message):
    with pytest.raises(ValueError, match=message):
        ode_sample(gaussian_field, torch.zeros(2, 2), solver, steps, grid=grid)
