"""Dynamics with known marginals q_t, observed as unpaired snapshots at a few times (the data of Action Matching).

A `Dynamics` gives `sample(t, n, generator)` -> [n, D] and the exact `log_prob(t, x)` -> [n] of its marginal at
time t in [0, 1]. `snapshots(name, n, times, generator)` draws n independent points at each observed time; no
point is followed from one time to the next, so the data hold no pairing.

- `rotating-gmm`: three Gaussians (weights 0.5, 0.3, 0.2) on a circle of radius 2.5, turning by a quarter turn
  and spreading (std 0.25 + 0.35 t) as time runs.
- `translation`: N(m_0 + t c, I), moved at constant velocity c.
- `ou`: the Ornstein-Uhlenbeck process dX = -theta X dt + sigma dW from N(m_0, v_0 I): Gaussian marginals with
  mean m_0 exp(-theta t) and variance sigma^2 / (2 theta) + (v_0 - sigma^2 / (2 theta)) exp(-2 theta t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DYNAMICS", "OBSERVED_TIMES", "GaussianMixtureDynamics", "get_dynamics", "snapshots"]

OBSERVED_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class GaussianMixtureDynamics:
    """q_t = sum_k w_k N(mean_k(t), std(t)^2 I) with mean_k(t) = R(turn t) (centre_k exp(-decay t) + drift t), R a
    rotation of the plane; std(t) = std_0 + std_growth t, or the OU law when ou_sigma is set."""

    centres: tuple[tuple[float, ...], ...]
    weights: tuple[float, ...]
    turn: float = 0.0  # radians over [0, 1] (2-D only)
    drift: tuple[float, ...] | None = None  # constant velocity c
    decay: float = 0.0  # OU mean-reversion rate theta
    std_0: float = 1.0
    std_growth: float = 0.0  # std(t) = std_0 + std_growth t (when not OU)
    ou_sigma: float | None = None  # OU diffusion sigma: the variance follows the OU law

    @property
    def dim(self) -> int:
        return len(self.centres[0])

    def means(self, t: float) -> Tensor:
        """Component means at time t, [K, D] float64."""
        m = torch.tensor(self.centres, dtype=torch.float64) * math.exp(-self.decay * t)
        if self.drift is not None:
            m = m + t * torch.tensor(self.drift, dtype=torch.float64)
        if self.turn:
            a = self.turn * t
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
            m = m @ rot.T
        return m

    def std(self, t: float) -> float:
        if self.ou_sigma is not None:
            stationary = self.ou_sigma**2 / (2 * self.decay)
            return math.sqrt(stationary + (self.std_0**2 - stationary) * math.exp(-2 * self.decay * t))
        return self.std_0 + self.std_growth * t

    def sample(self, t: float, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n points [n, D] (float32) from q_t."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means(t)[k] + self.std(t) * z).float()

    def log_prob(self, t: float, x: Tensor) -> Tensor:
        """Exact log q_t(x) [n] (float64) at x [n, D]."""
        s, d = self.std(t), self.dim
        d2 = (x.double()[:, None, :] - self.means(t)[None]).pow(2).sum(-1)
        log_comp = -d2 / (2 * s * s) - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)
        return torch.logsumexp(log_comp + torch.log(torch.tensor(self.weights, dtype=torch.float64)), 1)


_THIRDS = tuple((2.5 * math.cos(a), 2.5 * math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3))
DYNAMICS: dict[str, GaussianMixtureDynamics] = {
    "rotating-gmm": GaussianMixtureDynamics(_THIRDS, (0.5, 0.3, 0.2), turn=math.pi / 2, std_0=0.25, std_growth=0.35),
    "translation": GaussianMixtureDynamics(((-1.0, 0.0),), (1.0,), drift=(2.0, 1.0)),
    "ou": GaussianMixtureDynamics(((2.0, -1.0),), (1.0,), decay=2.0, std_0=math.sqrt(0.1), ou_sigma=1.0),
}


def get_dynamics(name: str) -> GaussianMixtureDynamics:
    if name not in DYNAMICS:
        raise ValueError(f"unknown dynamics {name!r}; allowed: {', '.join(DYNAMICS)}")
    return DYNAMICS[name]


def snapshots(
    name: str, n: int, times: tuple[float, ...] = OBSERVED_TIMES, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """n independent points at each observed time: (x [n K, D] float32, snapshot index [n K] int64)."""
    dyn = get_dynamics(name)
    xs = [dyn.sample(t, n, generator) for t in times]
    return torch.cat(xs), torch.arange(len(times)).repeat_interleave(n)
