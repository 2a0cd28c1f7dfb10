"""Riemannian Flow Matching (Chen and Lipman 2023) on the manifolds of `fm.manifolds`.

Training regresses a tangent field u_theta(x_t, t) onto the velocity of the geodesic conditional path
x_t = exp_{x_0}(t log_{x_0}(x_1)), x_0 from the uniform prior, x_1 a data point: || u_theta - dx_t ||^2 in the
manifold's metric (both manifolds here use the coordinates' Euclidean norm on tangent vectors).

Sampling integrates dx/dt = u_theta(x, t) on the manifold with fixed steps: Euler along geodesics (exponential-map
steps), or midpoint / RK4 whose stages are taken in ambient coordinates (the field is tangent off the manifold too)
and whose every step ends with the retraction back onto the manifold (the projection method, which keeps the
order of the Runge-Kutta scheme); or with any adaptive torchdiffeq solver in ambient coordinates, projected at the
end.

Likelihood (Riemannian change of variables): log p_1(x_1) = log p_0(x_0) - int_0^1 div_M u(x_t, t) dt. The field
the model gives is tangent at every ambient x (its output is projected with the normal x/|x| on the sphere), so
its ambient divergence equals the Riemannian one on the manifold: for an orthonormal tangent frame e_i and normal
n, tr(J) = sum_i e_i^T J e_i + n^T J n, and differentiating x . u(x) = 0 gives n^T J n = -(u . n)/|x| = 0. The
flat torus is read in angle coordinates, where the divergence is Euclidean. So `fm.likelihood.log_likelihood`
applies unchanged, with the uniform prior's log-density.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fm.likelihood import LikelihoodResult, LikelihoodSettings, log_likelihood
from fm.losses import sample_time
from fm.manifolds import Manifold
from fm.metrics import w2_from_cost
from fm.seeding import SeedStack
from fm.solvers import FIXED_METHODS, SampleResult, VelocityFn, ode_sample

__all__ = ["rfm_loss", "manifold_ode_sample", "manifold_log_likelihood", "geodesic_wasserstein2", "MANIFOLD_SOLVERS"]

# fixed-step solvers that stay on the manifold (number of field evaluations per step)
MANIFOLD_SOLVERS = {"euler": 1, "midpoint": 2, "rk4": 4}


def rfm_loss(
    model: nn.Module,
    manifold: Manifold,
    x_0: Tensor,
    x_1: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
) -> Tensor:
    """Riemannian CFM loss per sample [B] for prior points x_0 and data x_1 [B, D] (times drawn from `generator`
    unless given); averaged over the coordinates, as `fm.losses.cfm_loss`."""
    if t is None:
        t = sample_time(x_1.shape[0], 1.0, generator, x_1.device).to(x_1.dtype)
    x_t, dx_t = manifold.geodesic(x_0, x_1, t)
    v = model(x_t, t, y)
    return (v - dx_t).pow(2).mean(1)


def manifold_ode_sample(
    fn: VelocityFn,
    manifold: Manifold,
    x_0: Tensor,
    solver: str = "rk4",
    steps: int | None = 100,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    t_0: float = 0.0,
    t_1: float = 1.0,
    return_trajectory: bool = False,
) -> SampleResult:
    """Integrate a tangent field on the manifold from t_0 to t_1 (either direction), counting NFE.

    Args:
        fn: the field fn(x [B, D], t [B]) -> tangent vectors [B, D].
        x_0: starting points on the manifold [B, D].
        solver: "euler" (exponential-map steps), "midpoint" or "rk4" (retracted after every step), `steps` of them;
            or any adaptive torchdiffeq solver (ambient coordinates, projected onto the manifold at the end).
    Returns:
        `SampleResult` (end points on the manifold, exact NFE, the trajectory [steps + 1, B, D] if asked).
    """
    if solver not in MANIFOLD_SOLVERS:
        if solver in FIXED_METHODS:
            raise ValueError(
                f"solver {solver!r} steps off the manifold; fixed-step solvers on a manifold: "
                f"{', '.join(MANIFOLD_SOLVERS)}, or an adaptive torchdiffeq solver (e.g. dopri5)"
            )
        res = ode_sample(fn, x_0, solver, steps, atol, rtol, t_0, t_1, return_trajectory)
        projected = manifold.projx(res.trajectory) if res.trajectory is not None else None
        return SampleResult(manifold.projx(res.x_1), res.nfe, projected)
    if steps is None or steps < 1:
        raise ValueError(f"solver {solver!r} needs steps >= 1; got {steps}")
    h = (t_1 - t_0) / steps
    x, nfe, traj = manifold.projx(x_0), 0, [x_0]

    def f(x: Tensor, t: float) -> Tensor:
        nonlocal nfe
        nfe += 1
        return manifold.proju(x, fn(x, torch.full(x.shape[:1], t, dtype=x.dtype, device=x.device)))

    with torch.no_grad():
        for k in range(steps):
            t = t_0 + k * h
            k1 = f(x, t)
            if solver == "euler":
                x = manifold.expmap(x, h * k1)  # a geodesic step
            else:  # the stages in ambient coordinates (the field is tangent there too), then back onto the manifold
                if solver == "midpoint":
                    step = f(x + 0.5 * h * k1, t + 0.5 * h)
                else:
                    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
                    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
                    k4 = f(x + h * k3, t + h)
                    step = (k1 + 2 * k2 + 2 * k3 + k4) / 6
                x = manifold.projx(x + h * step)
            if return_trajectory:
                traj.append(x)
    return SampleResult(x, nfe, torch.stack(traj) if return_trajectory else None)


def manifold_log_likelihood(
    fn: VelocityFn,
    manifold: Manifold,
    x_1: Tensor,
    settings: LikelihoodSettings | None = None,
    generator: SeedStack | torch.Generator | None = None,
    log_p0: Callable[[Tensor], Tensor] | None = None,
) -> LikelihoodResult:
    """log p_1(x_1) [B] on the manifold, by the Riemannian change of variables (see the module docstring), with
    the uniform prior unless `log_p0` is given; x_0 of the result is projected onto the manifold."""
    prior = log_p0 or manifold.uniform_log_prob
    res = log_likelihood(fn, manifold.projx(x_1), settings, generator, log_p0=lambda x: prior(manifold.projx(x)))
    return LikelihoodResult(res.log_p, manifold.projx(res.x_0), res.nfe)


def geodesic_wasserstein2(manifold: Manifold, x: Tensor, y: Tensor) -> float:
    """Exact W2 between point clouds x [N, D] and y [M, D] on the manifold, with the squared geodesic distance
    as the cost (POT's network simplex)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    cost = manifold.dist(x[:, None, :], y[None, :, :]).pow(2).numpy()
    return w2_from_cost(cost)
