"""Action Matching (Neklyudov et al. 2022) from unpaired snapshots, and CFM on the same snapshots as its baseline.

Action Matching learns a scalar action s_theta(x, t) whose gradient is the velocity, by minimising

    L(s) = E_{q_0}[s(x, t_0)] - E_{q_1}[s(x, t_K)] + int E_{q_t}[ 1/2 |grad_x s|^2 + d_t s ] dt,

which equals 1/2 int E_{q_t} |grad s - grad s*|^2 dt - 1/2 int E_{q_t} |grad s*|^2 dt for the gradient field grad s*
that moves q_t (so its minimum is minus the path's kinetic energy, an analytic check).

The data are snapshots: unpaired samples of q_t at observed times t_0 < ... < t_K. The time integral needs
samples between them, which no snapshot holds; they are made by interpolating an independent pair of consecutive
snapshots, x_tau = (1 - tau) a + tau b, a ~ q_{t_k}, b ~ q_{t_k+1}. That path agrees with q_t at every observed
time (not in between), so the learned gradient field carries each snapshot to the next. A loss over the whole
path is a sum over the segments: for a pair in segment k,

    s(a, t_k) - s(b, t_k+1) + (t_k+1 - t_k) [1/2 |grad s|^2 + d_t s](x_tau, t_k + tau (t_k+1 - t_k)).

The CFM baseline regresses a free velocity field on the same pairs onto (b - a) / (t_k+1 - t_k) (I-CFM on
consecutive snapshots). Both fields generate the same interpolated marginals; Action Matching's is the one of
least kinetic energy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fm.couplings import Coupling, IndependentCoupling
from fm.seeding import draw_device
from fm.solvers import VelocityFn, ode_sample

__all__ = [
    "snapshot_pairs",
    "segment_times",
    "action_matching_loss",
    "snapshot_cfm_loss",
    "action_velocity",
    "transport",
]


def snapshot_pairs(
    x: Tensor, k: Tensor, num_times: int, generator: torch.Generator | None = None, coupling: Coupling | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs of consecutive snapshots within a batch.

    Every row of snapshot k < K is paired with a row of snapshot k + 1 of the same batch: drawn uniformly (with
    replacement) from `generator`, or by `coupling`'s plan between the two snapshots' rows (minibatch exact OT: a
    permutation for equal counts, else max(n_k, n_k+1) pairs drawn from the plan between uniform marginals by
    systematic resampling, so that no row of either time is favoured or left out). Rows of the last snapshot only
    appear as partners; rows whose next snapshot has no row in the batch are left out.

    Args:
        x: points [B, D]; k: their snapshot index [B] in 0..num_times-1.
    Returns:
        (a [P, D], b [P, D], segment [P]): a from snapshot segment, b from segment + 1.
    """
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= num_times):
        raise ValueError(f"snapshot indices must lie in 0..{num_times - 1}; got {int(k.min())}..{int(k.max())}")
    starts, partners, segments = [], [], []
    for seg in range(num_times - 1):
        here = (k == seg).nonzero().flatten()
        there = (k == seg + 1).nonzero().flatten()
        if len(here) == 0 or len(there) == 0:
            continue
        if coupling is None or isinstance(coupling, IndependentCoupling):
            i = torch.arange(len(here), device=k.device)
            j = torch.randint(len(there), (len(here),), generator=generator, device=k.device)
        else:
            i, j = coupling.plan_indices(x[here], x[there], generator)
        starts.append(here[i])
        partners.append(there[j])
        segments.append(torch.full_like(i, seg))
    if not starts:
        raise ValueError("no pair of consecutive snapshots in the batch: a batch needs rows of two adjacent times")
    i, j = torch.cat(starts), torch.cat(partners)
    return x[i], x[j], torch.cat(segments)


def segment_times(times: Tensor, segment: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t_k [P], t_k+1 [P], t_k + tau (t_k+1 - t_k) [P]) for segment indices [P] and fractions tau [P]."""
    t_a, t_b = times[segment], times[segment + 1]
    return t_a, t_b, t_a + tau * (t_b - t_a)


def _interpolate(a: Tensor, b: Tensor, times: Tensor, segment: Tensor, generator: torch.Generator | None):
    tau = torch.rand(a.shape[0], generator=generator, device=draw_device(generator, a.device), dtype=a.dtype).to(
        a.device
    )
    t_a, t_b, t = segment_times(times.to(a.device, a.dtype), segment, tau)
    return (1 - tau[:, None]) * a + tau[:, None] * b, t_a, t_b, t


def action_matching_loss(
    model: nn.Module, a: Tensor, b: Tensor, segment: Tensor, times: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Per-pair Action Matching loss [P] (module docstring) for the scalar model s(x [P, D], t [P]) -> [P, 1];
    its batch mean estimates L(s) / K for K segments of equal weight."""
    x_tau, t_a, t_b, t = _interpolate(a, b, times, segment, generator)
    with torch.enable_grad():  # the loss holds derivatives of s; the training step backpropagates through them
        x_tau = x_tau.detach().requires_grad_(True)
        t = t.detach().requires_grad_(True)
        s = model(x_tau, t).sum()
        grad_x, d_t = torch.autograd.grad(s, (x_tau, t), create_graph=True)
    ends = model(a, t_a)[:, 0] - model(b, t_b)[:, 0]
    return ends + (t_b - t_a) * (0.5 * grad_x.pow(2).sum(1) + d_t)


def snapshot_cfm_loss(
    model: nn.Module, a: Tensor, b: Tensor, segment: Tensor, times: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Per-pair CFM loss [P] on the same interpolant: || v(x_tau, t) - (b - a) / (t_k+1 - t_k) ||^2 averaged over
    coordinates, as `fm.losses.cfm_loss`."""
    x_tau, t_a, t_b, t = _interpolate(a, b, times, segment, generator)
    target = (b - a) / (t_b - t_a)[:, None]
    return (model(x_tau, t) - target).pow(2).mean(1)


def action_velocity(model: nn.Module) -> VelocityFn:
    """The velocity grad_x s(x, t) [B, D] of a scalar action model, usable under `torch.no_grad()` (samplers)."""

    def fn(x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(x, t).sum(), x)
        return grad

    return fn


def transport(
    fn: VelocityFn,
    x: Tensor,
    times: Tensor | list[float],
    solver: str = "rk4",
    steps: int | None = 20,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> tuple[list[Tensor], int]:
    """Carry points x [B, D] observed at times[0] to every later observed time along fn.

    Returns ([x at times[0], x at times[1], ...], total NFE); a fixed-step solver takes `steps` steps per segment.
    """
    times = [float(t) for t in times]
    out, nfe = [x], 0
    for t_a, t_b in zip(times[:-1], times[1:], strict=True):
        res = ode_sample(fn, out[-1], solver, steps, atol, rtol, t_0=t_a, t_1=t_b)
        out.append(res.x_1)
        nfe += res.nfe
    return out, nfe
