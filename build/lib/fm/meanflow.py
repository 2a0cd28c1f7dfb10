"""MeanFlow (Geng, Deng, Bai, Kolter and He 2025, "Mean Flows for One-step Generative Modeling"): a model of the
*average* velocity over an interval, so that one network call jumps from noise to data.

Convention (ours, as everywhere in `fm`): t = 0 is noise x_0, t = 1 is data x_1, x_t = (1 - t) x_0 + t x_1, and
the conditional velocity is v = x_1 - x_0. The flow runs forward, so an interval starts at the current time t and
ends at a later time r >= t. The average velocity of the marginal flow z_tau (its ODE dz/dtau = v(z_tau, tau))
over [t, r] is

    u(z_t, t, r) = 1 / (r - t) * integral_t^r v(z_tau, tau) dtau,   so   z_r = z_t + (r - t) u(z_t, t, r).

Differentiating (r - t) u(z_t, t, r) = integral_t^r v dtau in t, the start, along the trajectory (r fixed):
-u + (r - t) d/dt u = -v(z_t, t), i.e. the MeanFlow identity in this convention,

    u(z_t, t, r) = v(z_t, t) + (r - t) d/dt u(z_t, t, r),   d/dt u = v . grad_z u + d_t u,

with a plus sign: the paper's time runs from data (0) to noise (1) and its identity, u = v - (t - r) d/dt u,
differentiates at the interval's *end*, which moves the other way. d/dt u is one forward-mode product (a JVP) of
the model along the tangent (v, 1, 0) in (z, t, r). Training regresses u_theta(z_t, t, r) on the stop-gradient
target v + (r - t) d/dt u_theta (Eq. 10), with the conditional v = x_1 - x_0 in place of the marginal one (as CFM
does: the target is then right in expectation). At r = t the target is v and the loss is CFM's.

Sampling: x_1 = x_0 + u(x_0, 0, 1) in one step; k steps chain the intervals of a uniform grid (`jump_sample`).

The model takes two times (`fm.models.MLP` / `UNet` with `two_times=True`). Since the target holds the model's
time derivative, smooth time features (`time_scale=1`) train far better than the default high-frequency ones
(`tests/fm/test_meanflow.py` states the figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from fm.losses import UNIFORM, TimeSampling, sample_time
from fm.seeding import draw_device
from fm.solvers import SampleResult, time_grid

__all__ = [
    "MeanFlowSettings",
    "AverageVelocityFn",
    "sample_interval",
    "meanflow_loss",
    "meanflow_target",
    "jump_sample",
    "average_velocity_fn",
]


@dataclass(frozen=True)
class MeanFlowSettings:
    """MeanFlow's training options, with the paper's defaults (Sec. 4.3, Table 1).

    ratio: the fraction of draws with r != t (Table 1a: 25%); the rest train the instantaneous velocity (r = t).
    time_sampling: the density of both draws of (t, r) (Table 1b: logit-normal with the paper's mean -0.4, i.e.
        loc 0.4 in our time, which runs the other way, and scale 1.0, is its best; uniform is the default here, as
        for every method, and `method.time_sampling` chooses).
    adaptive_p, adaptive_c: the adaptive loss weight w = 1 / (||Delta||^2 + c)^p on the squared error summed over
        dimensions (Sec. 4.3, Table 1d: p = 1 best; p = 0 is the plain squared error), c = 1e-3.
    """

    ratio: float = 0.25
    time_sampling: TimeSampling = UNIFORM
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"meanflow ratio (the fraction of draws with r != t) must be in [0, 1]; got {self.ratio}")
        if self.adaptive_p < 0 or self.adaptive_c <= 0:
            raise ValueError(
                f"meanflow's adaptive weight needs p >= 0 and c > 0; got p={self.adaptive_p}, c={self.adaptive_c}"
            )


def sample_interval(
    batch: int, generator: torch.Generator | None, device: torch.device | str, settings: MeanFlowSettings
) -> tuple[Tensor, Tensor]:
    """Training intervals (t [B], r [B]) with 0 <= t <= r <= 1: two draws of the time density, ordered, and r set
    to t in a fraction 1 - ratio of the rows (a mask drawn from `generator` too)."""
    a = sample_time(batch, 1.0, generator, device, settings.time_sampling)
    b = sample_time(batch, 1.0, generator, device, settings.time_sampling)
    equal = torch.rand(batch, generator=generator, device=draw_device(generator, device)).to(device) >= settings.ratio
    t, r = torch.minimum(a, b), torch.maximum(a, b)
    return t, torch.where(equal, t, r)


def meanflow_loss(
    model: nn.Module,
    x_0: Tensor,
    x_1: Tensor,
    t: Tensor,
    r: Tensor,
    y: Tensor | None = None,
    settings: MeanFlowSettings = MeanFlowSettings(),
) -> Tensor:
    """The per-sample MeanFlow loss [B] for pairs x_0, x_1 [B, ...] and intervals t <= r [B].

    u_theta(x_t, t, r) and d/dt u_theta come from one `torch.func.jvp` along (v, 1, 0); the target
    v + (r - t) d/dt u_theta is detached. The loss is sg(w) ||Delta||^2 / D (D the dimensions, so that with
    p = 0 and r = t it equals `fm.losses.cfm_loss`).
    """
    if bool((r < t).any()):
        raise ValueError("MeanFlow intervals need r >= t (t = 0 is noise, r the later end)")
    t, r = t.to(x_0.dtype), r.to(x_0.dtype)
    shape = (-1,) + (1,) * (x_0.dim() - 1)
    v = x_1 - x_0
    u, target = meanflow_target(model, (1 - t.view(shape)) * x_0 + t.view(shape) * x_1, t, r, v, y)
    squared = (u - target).pow(2).flatten(1).sum(1)
    weight = (squared.detach() + settings.adaptive_c).pow(-settings.adaptive_p)
    return weight * squared / v[0].numel()


def meanflow_target(
    model: nn.Module, x_t: Tensor, t: Tensor, r: Tensor, v: Tensor, y: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(u_theta(x_t, t, r) [B, ...] with gradients, its target v + (r - t) d/dt u_theta [B, ...] without).

    d/dt u_theta is one forward-mode product (`torch.func.jvp`) along the tangent (v, 1, 0) in (x_t, t, r), taken
    without gradients on the module itself: a DDP or torch.compile wrapper serves the backward pass, which the
    target (stop-gradient) has none of, so the wrapper sees only the ordinary forward that gives u. One forward more
    than reading u off the JVP, and no forward-mode AD through DDP's hooks.
    """
    inner = _unwrapped(model)
    with torch.no_grad():
        _, du_dt = torch.func.jvp(
            lambda z, tt, rr: inner(z, tt, y, rr), (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r))
        )[:2]
    u = model(x_t, t, y, r)
    return u, v + (r - t).view((-1,) + (1,) * (v.dim() - 1)) * du_dt


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's and DDP's wrappers (their `_orig_mod` and `module`)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) or (
        type(model).__name__ == "DistributedDataParallel"
    ):
        model = cast(nn.Module, getattr(model, "_orig_mod", None) or model.module)
    return model


class AverageVelocityFn:
    """u(x [B, ...], t [B], r [B]) -> [B, ...] of a two-time model (labels y fixed), counting calls."""

    def __init__(self, model: nn.Module, y: Tensor | None = None):
        self.model, self.y, self.calls = model, y, 0

    def __call__(self, x: Tensor, t: Tensor, r: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x, t, self.y, r)


def average_velocity_fn(model: nn.Module, y: Tensor | None = None) -> AverageVelocityFn:
    """The average-velocity field of a trained two-time model."""
    return AverageVelocityFn(model, y)


@torch.no_grad()
def jump_sample(fn: AverageVelocityFn, x_0: Tensor, steps: int = 1, grid: str = "uniform") -> SampleResult:
    """x_1 [B, ...] from x_0 [B, ...] in `steps` jumps over a grid of [0, 1] (`fm.solvers.time_grid`: uniform or
    edm): x <- x + (r - t) u(x, t, r). NFE = steps (one network call per jump)."""
    if steps < 1:
        raise ValueError(f"jump sampling needs steps >= 1; got {steps}")
    times = time_grid(steps, grid=grid, dtype=torch.float64).tolist()
    x = x_0
    for t, r in zip(times[:-1], times[1:], strict=True):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        rr = torch.full((x.shape[0],), r, device=x.device, dtype=x.dtype)
        x = x + (r - t) * fn(x, tt, rr)
    return SampleResult(x, steps)
