"""Sampling: ODE through torchdiffeq (NFE counted) and Euler–Maruyama SDE sampling.

A velocity function has the model signature `fn(x [B, ...], t [B]) -> [B, ...]`; build one from a model with
`velocity_fn`, which also applies classifier-free guidance and converts epsilon/x_1/score predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from fm.paths import AffinePath, VPScheduler

__all__ = [
    "VelocityFn",
    "SampleResult",
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "velocity_fn",
    "is_adaptive",
    "check_solver",
    "GRIDS",
    "time_grid",
    "integration_times",
    "ode_sample",
    "sde_sample",
    "vp_diffusion",
    "constant_diffusion",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def autocast_field(fn: VelocityFn, dtype: torch.dtype | None, device_type: str) -> VelocityFn:
    """The field evaluated under autocast (bf16 or fp16 network arithmetic), its output cast back to the state's
    dtype, so that the solver's state, error estimates and steps stay in fp32. `dtype` None: `fn` itself."""
    if dtype is None:
        return fn

    def field(x: Tensor, t: Tensor, *more: Tensor) -> Tensor:  # more: an average-velocity field's interval end
        with torch.autocast(device_type, dtype=dtype):
            return fn(x, t, *more).to(x.dtype)

    return field


ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
GRIDS = ("uniform", "edm")  # where a fixed-step solver's steps fall (`time_grid`)
EDM_SIGMA_MAX, EDM_SIGMA_MIN, EDM_RHO = 80.0, 0.002, 7.0  # Karras et al. 2022, Sec. 3 and Table 1


@dataclass
class SampleResult:
    """x_1: samples [B, ...]; nfe: function evaluations of the whole batch; trajectory: [T, B, ...] or None."""

    x_1: Tensor
    nfe: int
    trajectory: Tensor | None = None


def velocity_fn(
    model: nn.Module,
    y: Tensor | None = None,
    cfg_scale: float = 1.0,
    prediction: str = "velocity",
    path: AffinePath | None = None,
) -> VelocityFn:
    """Turn a model into a velocity function fn(x, t).

    Args:
        model: forward(x, t, y) -> prediction.
        y: class labels [B] for a conditional model, or None.
        cfg_scale: classifier-free guidance w: v = v_null + w (v_y - v_null). 1 is plain conditional sampling;
            anything else needs labels and a model trained with a null class.
        prediction: what the model outputs ("velocity", "x_1", "epsilon" or "score"); non-velocity outputs are
            converted through `path`.
        path: the Gaussian path the model was trained on (needed unless prediction is "velocity").
    """
    if prediction != "velocity" and path is None:
        raise ValueError(f"prediction {prediction!r} needs the path to convert it to a velocity")
    if cfg_scale != 1.0 and y is None:
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs class labels y")

    def raw(x: Tensor, t: Tensor) -> Tensor:
        if cfg_scale == 1.0:
            return model(x, t, y)
        assert y is not None  # checked above: guidance has labels
        null = torch.full_like(y, cast(int, model.num_classes))
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_y, v_null = both.chunk(2)
        return v_null + cfg_scale * (v_y - v_null)

    if prediction == "velocity":
        return raw
    if path is None:
        raise ValueError(f"a model that predicts {prediction!r} needs its Gaussian path to give a velocity")
    return lambda x, t: path.convert(raw(x, t), prediction, "velocity", x, t)


def time_grid(
    steps: int,
    t_0: float = 0.0,
    t_1: float = 1.0,
    device: torch.device | str = "cpu",
    grid: str = "uniform",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """steps + 1 times from t_0 to t_1, shape [steps + 1] (`dtype`, default torch's, on `device`).

    grid="uniform": evenly spaced. grid="edm": the noise levels of Karras et al. 2022 (EDM, Eq. 5),
    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < steps
    (sigma_max 80, sigma_min 0.002, rho 7), placed where the OT path x_t = t x_1 + (1 - t) x_0 has that ratio of noise
    to signal, sigma = (1 - t) / t, i.e. u_i = 1 / (1 + sigma_i); then u_steps = 1. The first time, 1/81, becomes 0,
    so that a sample still starts from pure noise at t_0. In t the steps are short at both ends and long in the
    middle (8 steps: 0, .028, .068, .177, .437, .789, .966, .998, 1). The times are u mapped onto [t_0, t_1]; one
    step is [t_0, t_1] on either grid.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; allowed: {', '.join(GRIDS)}")
    if grid == "uniform" or steps == 1:
        return torch.linspace(t_0, t_1, steps + 1, device=device, dtype=dtype)
    i = torch.arange(steps, dtype=torch.float64)
    a, b = EDM_SIGMA_MAX ** (1 / EDM_RHO), EDM_SIGMA_MIN ** (1 / EDM_RHO)
    sigma = (a + i / (steps - 1) * (b - a)) ** EDM_RHO
    u = torch.cat([1 / (1 + sigma), torch.ones(1, dtype=torch.float64)])
    u[0] = 0.0
    return (t_0 + (t_1 - t_0) * u).to(device=device, dtype=dtype or torch.get_default_dtype())


def is_adaptive(solver: str) -> bool:
    """Whether a torchdiffeq solver chooses its own steps (its NFE is then a result, not a setting)."""
    return solver in ADAPTIVE_METHODS


def check_solver(solver: str, steps: int | None, atol: float, rtol: float, grid: str = "uniform") -> None:
    """Raise ValueError unless these are valid settings of an ODE solve: a known solver, steps >= 1 for a
    fixed-step solver, positive tolerances for an adaptive one, and a time grid other than uniform only where the
    solver takes fixed steps."""
    methods = ADAPTIVE_METHODS + FIXED_METHODS
    if solver not in methods:
        raise ValueError(f"unknown ODE method {solver!r}; allowed: {', '.join(methods)}")
    if solver in FIXED_METHODS and (steps is None or steps < 1):
        raise ValueError(f"fixed-step method {solver!r} needs steps (an integer >= 1); got {steps}")
    if is_adaptive(solver) and (atol <= 0 or rtol <= 0):
        raise ValueError(f"atol and rtol must be > 0; got atol={atol}, rtol={rtol}")
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; allowed: {', '.join(GRIDS)}")
    if grid != "uniform" and is_adaptive(solver):
        raise ValueError(f"time grid {grid!r} places fixed steps; the adaptive solver {solver!r} chooses its own")


def integration_times(
    solver: str,
    steps: int | None,
    t_0: float,
    t_1: float,
    atol: float,
    rtol: float,
    like: Tensor,
    grid: str = "uniform",
) -> Tensor:
    """Validate solver settings and return the times handed to odeint: the fixed grid, or just [t_0, t_1]."""
    check_solver(solver, steps, atol, rtol, grid)
    if solver in FIXED_METHODS and steps is not None:  # (check_solver: a fixed-step solver has its steps)
        return time_grid(steps, t_0, t_1, like.device, grid).to(like.dtype)
    return torch.tensor([t_0, t_1], device=like.device, dtype=like.dtype)


def ode_sample(
    fn: VelocityFn,
    x_0: Tensor,
    solver: str = "dopri5",
    steps: int | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    t_0: float = 0.0,
    t_1: float = 1.0,
    return_trajectory: bool = False,
    t_limit: float | None = None,
    grid: str = "uniform",
) -> SampleResult:
    """Integrate dx/dt = v(x, t) from t_0 to t_1 with torchdiffeq.

    Args:
        fn: velocity function fn(x [B, ...], t [B]).
        x_0: starting points [B, ...] (noise when sampling).
        solver: any torchdiffeq solver; adaptive ones use atol/rtol, fixed-step ones need `steps`.
        steps: number of steps of a fixed-step solver (the grid has steps + 1 times).
        atol, rtol: tolerances of an adaptive solver.
        return_trajectory: also return x at every grid time (fixed-step) or at t_0 and t_1 (adaptive).
        t_limit: the largest time at which fn is defined (the VP path's t_max); an adaptive step that overshoots
            it sees the field at t_limit. None (every other path) leaves the field alone, as torchdiffeq and the
            public libraries do: clamping puts a kink at the end time that costs rejected steps and inflates NFE.
    Returns:
        `SampleResult` with the end points and the exact NFE (calls of fn on the batch).
    """
    # torchdiffeq is imported where it is used: it pulls in scipy.integrate (~0.8 s), which every training and data
    # worker that imports fm but never integrates would otherwise pay at start
    from torchdiffeq import odeint

    ts = integration_times(solver, steps, t_0, t_1, atol, rtol, x_0, grid)
    nfe = 0

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        if t_limit is not None:  # adaptive steps may overshoot the end time and interpolate back
            t = t.clamp(max=t_limit)
        return fn(x, t.expand(x.shape[0]))

    with torch.no_grad():
        traj = odeint(rhs, x_0, ts, method=solver, atol=atol, rtol=rtol)
    return SampleResult(traj[-1], nfe, traj if return_trajectory else None)


def vp_diffusion(scheduler: VPScheduler) -> Callable[[Tensor], Tensor]:
    """g(t) = sqrt(beta(1 - t)): with it `sde_sample` is the reverse SDE of the VP diffusion (Song et al.)."""
    return lambda t: torch.sqrt(scheduler.beta(1.0 - t))


def constant_diffusion(g: float) -> Callable[[Tensor], Tensor]:
    """g(t) = g."""
    return lambda t: torch.full_like(t, g)


def sde_sample(
    fn: VelocityFn,
    path: AffinePath,
    diffusion: Callable[[Tensor], Tensor],
    x_0: Tensor,
    steps: int,
    t_1: float = 1.0 - 1e-3,
    noise: Callable[[int], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Euler–Maruyama for dx = [v(x, t) + g(t)^2 / 2 * score(x, t)] dt + g(t) dW, from t = 0 to t_1.

    For any g this SDE has the same marginals as the ODE dx = v dt (the Fokker–Planck terms of the added drift
    and noise cancel), so a flow model can be sampled stochastically. The score comes from the velocity through
    the Gaussian `path`. With `vp_diffusion` and an epsilon model this is exactly the reverse VP SDE
    dx = [-f + g^2 score] dt + g dW of score-based models. The last step is taken without noise (denoising).

    Args:
        fn: velocity function. path: the Gaussian path behind the model. diffusion: g(t [B]) -> [B].
        x_0: noise [B, ...]. steps: Euler–Maruyama steps. t_1: end time (< 1 where sigma_1 = 0).
        noise: optional noise(step) -> [B, ...] standard normal draws (for per-sample seeding); default draws
            from `generator`.
    Returns:
        `SampleResult`; nfe = steps.
    """
    ts = time_grid(steps, 0.0, t_1, x_0.device).to(x_0.dtype)
    x = x_0
    with torch.no_grad():
        for k in range(steps):
            t = ts[k].expand(x.shape[0])
            dt = ts[k + 1] - ts[k]
            v = fn(x, t)
            score = path.convert(v, "velocity", "score", x, t)
            g = diffusion(t).reshape(-1, *([1] * (x.dim() - 1)))
            x = x + (v + 0.5 * g**2 * score) * dt
            if k < steps - 1:
                z = (
                    noise(k)
                    if noise is not None
                    else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                )
                x = x + g * torch.sqrt(dt) * z
    return SampleResult(x, steps)
