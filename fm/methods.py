"""Training methods: a path, a coupling and a loss that together define what a model learns.

| name     | path                         | coupling            | model predicts | loss |
|----------|------------------------------|---------------------|----------------|------|
| fm_ot    | OT path with sigma_min       | independent         | velocity       | CFM  |
| fm_vp    | VP diffusion path            | independent         | velocity       | CFM  |
| score_vp | VP diffusion path            | independent         | epsilon        | DSM  |
| icfm     | straight line + const sigma  | independent         | velocity       | CFM  |
| otcfm    | straight line + const sigma  | exact OT (local or global batch) | velocity | CFM |
| sbcfm    | Brownian bridge, sigma       | entropic OT, reg = 2 sigma^2 | velocity | CFM |

Every method gives a velocity field for ODE sampling and likelihood; the score model through its probability-flow
ODE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fm.couplings import Coupling, EntropicOTCoupling, ExactOTCoupling, GlobalOTCoupling, IndependentCoupling
from fm.losses import cfm_loss, dsm_loss, sample_time
from fm.paths import AffinePath, CondOTScheduler, NoisyLinearPath, VPScheduler
from fm.solvers import VelocityFn, velocity_fn

__all__ = ["METHODS", "Method", "make_method"]

METHODS = ("fm_ot", "fm_vp", "score_vp", "icfm", "otcfm", "sbcfm")

# sigma_1 = 0 on the VP path, where its velocity and score targets diverge: train and sample on t <= 1 - eps.
VP_T_MAX = 1.0 - 1e-5


@dataclass
class Method:
    """A path, a coupling and the model's prediction kind, with the training loss and the sampling field."""

    name: str
    path: AffinePath | NoisyLinearPath
    coupling: Coupling
    prediction: str = "velocity"
    t_max: float = 1.0

    def loss(self, model: nn.Module, x_1: Tensor, y: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """Per-sample training loss [B] for data x_1 [B, ...]; draws the noise, the pairing and the times."""
        x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
        x_0, x_1, y = self.coupling(x_0, x_1, y)
        t = sample_time(x_1.shape[0], self.t_max, generator, x_1.device).to(x_1.dtype)
        if self.prediction == "epsilon":
            return dsm_loss(model, self.path, x_0, x_1, t, y)
        if isinstance(self.path, NoisyLinearPath):
            eps = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
            return cfm_loss(model, self.path.sample(x_0, x_1, t, eps), y)
        return cfm_loss(model, self.path.sample(x_0, x_1, t), y)

    @property
    def gaussian_path(self) -> AffinePath:
        """The Gaussian path for score conversions (SDE sampling); I-CFM with sigma = 0 is the OT path."""
        if isinstance(self.path, AffinePath):
            return self.path
        if self.path.sigma == 0 and isinstance(self.coupling, IndependentCoupling):
            return AffinePath(CondOTScheduler(0.0))
        raise ValueError(f"method {self.name!r} has no Gaussian marginal path, so it has no score for SDE "
                         "sampling; use an ODE solver")

    def velocity(self, model: nn.Module, y: Tensor | None = None, cfg_scale: float = 1.0) -> VelocityFn:
        """The velocity field of a trained model (converted from epsilon for the score model)."""
        path = self.path if isinstance(self.path, AffinePath) else None
        return velocity_fn(model, y, cfg_scale, self.prediction, path)


def make_method(name: str, sigma_min: float = 1e-4, sigma: float = 0.0, ot_scope: str = "local",
                beta_min: float = 0.1, beta_max: float = 20.0) -> Method:
    """Build a method by name.

    Args:
        name: one of METHODS.
        sigma_min: the OT path's end-point std (fm_ot).
        sigma: noise of the straight-line paths (icfm, otcfm, sbcfm; sbcfm needs sigma > 0).
        ot_scope: "local" (solve per worker batch) or "global" (one plan over all ranks) for otcfm.
        beta_min, beta_max: the VP schedule (fm_vp, score_vp).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    if ot_scope not in ("local", "global"):
        raise ValueError(f"unknown ot_scope {ot_scope!r}; allowed: local, global")
    if name == "fm_ot":
        return Method(name, AffinePath(CondOTScheduler(sigma_min)), IndependentCoupling())
    if name in ("fm_vp", "score_vp"):
        path = AffinePath(VPScheduler(beta_min, beta_max))
        return Method(name, path, IndependentCoupling(), "epsilon" if name == "score_vp" else "velocity", VP_T_MAX)
    if name == "icfm":
        return Method(name, NoisyLinearPath(sigma), IndependentCoupling())
    if name == "otcfm":
        return Method(name, NoisyLinearPath(sigma), GlobalOTCoupling() if ot_scope == "global" else ExactOTCoupling())
    if sigma <= 0:
        raise ValueError(f"sbcfm needs sigma > 0 (entropic regularisation 2 sigma^2); got sigma={sigma}")
    return Method(name, NoisyLinearPath(sigma, "brownian"), EntropicOTCoupling(reg=2 * sigma**2))
