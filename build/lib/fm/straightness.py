"""How straight a flow's trajectories are: what few-step sampling depends on.

Rectified Flow (Liu, Gong and Liu 2022, "Flow Straight and Fast", Eq. 6) measures a flow Z by its straightness

    S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt,

zero exactly when every trajectory is a straight line run at constant speed, which one Euler step solves. Here S is
reported per dimension (divided by D, so image sizes compare) and relative to the squared length of the trajectory's
chord, E||Z_1 - Z_0||^2 / D (scale-free: 0 for straight paths, 1 when the velocity's deviation is as large as the
displacement). Beside it, the chord deviation: the largest distance of a trajectory from its chord, over the chord's
length, the curvature a solver's step size feels.

Trajectories are solved with fixed RK4 steps; S is the trapezoid rule over the grid of the velocity at each grid
point. Times run from t_0 to t_1 (t_1 = t_max < 1 on the VP path), and velocities are compared with the chord's
constant velocity (Z_1 - Z_0) / (t_1 - t_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fm.solvers import VelocityFn, ode_sample, time_grid

__all__ = ["Straightness", "straightness"]


@dataclass(frozen=True)
class Straightness:
    """Per-trajectory figures, each [B]; `summary()` gives their means."""

    straightness: Tensor  # int || chord velocity - v ||^2 dt / D
    chord_sq: Tensor  # || Z_1 - Z_0 ||^2 / D
    chord_deviation: Tensor  # max_t || Z_t - chord(t) || / || Z_1 - Z_0 ||
    steps: int
    nfe: int  # calls of the field on the batch: 4 per RK4 step, plus one per grid point for S

    def summary(self) -> dict[str, float]:
        """Means over the trajectories: `straightness`, `straightness_relative` (mean S over mean chord length
        squared) and `chord_deviation`."""
        s, c = self.straightness.mean().item(), self.chord_sq.mean().item()
        return {
            "straightness": s,
            "straightness_relative": s / c if c > 0 else float("nan"),
            "chord_deviation": self.chord_deviation.mean().item(),
        }


def straightness(fn: VelocityFn, x_0: Tensor, steps: int = 16, t_0: float = 0.0, t_1: float = 1.0) -> Straightness:
    """Straightness and chord deviation of the trajectories of dx/dt = fn(x, t) from x_0 [B, ...].

    Args:
        fn: velocity fn(x [B, ...], t [B]) -> [B, ...].
        x_0: starting points [B, ...].
        steps: RK4 steps; the velocity is read at the steps + 1 grid points.
        t_0, t_1: the time interval (the method's t_0 and t_max).
    Returns:
        `Straightness`, per trajectory.
    """
    if steps < 1:
        raise ValueError(f"straightness needs steps >= 1; got {steps}")
    solved = ode_sample(fn, x_0, "rk4", steps, t_0=t_0, t_1=t_1, return_trajectory=True)
    path = solved.trajectory  # [steps + 1, B, ...]
    assert path is not None  # asked for with return_trajectory
    ts = time_grid(steps, t_0, t_1, x_0.device).to(x_0.dtype)
    b = x_0.shape[0]
    with torch.no_grad():
        v = torch.stack([fn(path[k], ts[k].expand(b)) for k in range(steps + 1)])
    chord = path[-1] - path[0]  # [B, ...]
    dims = chord[0].numel()
    chord_v = chord / (t_1 - t_0)
    gap = (v - chord_v).pow(2).flatten(2).sum(2)  # [steps + 1, B]
    # in the chord's own time s = (t - t_0) / (t_1 - t_0), dZ/ds = (t_1 - t_0) v: S = (t_1 - t_0) int gap dt
    s = torch.trapezoid(gap, ts, dim=0) * (t_1 - t_0) / dims
    along = ((ts - t_0) / (t_1 - t_0)).view(-1, *([1] * x_0.dim()))
    off = (path - (path[0] + along * chord)).flatten(2).norm(dim=2)  # [steps + 1, B]
    length = chord.flatten(1).norm(dim=1)
    return Straightness(
        s,
        chord.pow(2).flatten(1).sum(1) / dims,
        off.max(0).values / length.clamp_min(1e-12),
        steps,
        solved.nfe + steps + 1,
    )
