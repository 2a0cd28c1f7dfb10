"""Training losses. Each returns per-sample values of shape [B]; the caller reduces."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fm.paths import AffinePath, PathSample, VPScheduler, check_pair
from fm.seeding import draw_device

__all__ = ["TIME_SAMPLINGS", "TimeSampling", "UNIFORM", "cfm_loss", "dsm_loss", "sample_time"]

TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimeSampling:
    """How training draws t: its density on [0, 1], scaled to [0, t_max].

    - "uniform": t ~ U[0, 1] (Lipman et al. 2022; Tong et al. 2023).
    - "logit_normal": t = sigmoid(loc + scale * n), n ~ N(0, 1) (Esser et al. 2024, "Scaling Rectified Flow
      Transformers", Sec. 3.1): density pi(t) = N(logit(t); loc, scale) / (t (1 - t)), which puts more of the
      training steps on the middle of the path, where the velocity is hardest to predict. t = 1 is data here, so
      loc > 0 favours times near the data (the paper's t is the noise level: its loc is our -loc).
    """

    name: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if self.name not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.name!r}; allowed: {', '.join(TIME_SAMPLINGS)}")
        if self.name == "logit_normal" and not (
            math.isfinite(self.loc) and math.isfinite(self.scale) and self.scale > 0
        ):
            raise ValueError(
                f"logit-normal time sampling needs a finite loc and a scale > 0; got loc={self.loc}, scale={self.scale}"
            )

    def density(self, t: Tensor) -> Tensor:
        """The density of t on (0, 1), [N] -> [N] (before scaling by t_max)."""
        if self.name == "uniform":
            return torch.ones_like(t)
        logit = torch.log(t) - torch.log1p(-t)
        normal = torch.exp(-0.5 * ((logit - self.loc) / self.scale) ** 2) / (self.scale * math.sqrt(2 * math.pi))
        return normal / (t * (1 - t))

    def cdf(self, t: Tensor) -> Tensor:
        """P(T <= t) on [0, 1], [N] -> [N]."""
        if self.name == "uniform":
            return t.clamp(0, 1)
        logit = torch.log(t) - torch.log1p(-t)
        return 0.5 * (1 + torch.erf((logit - self.loc) / (self.scale * math.sqrt(2))))


UNIFORM = TimeSampling()


def sample_time(
    batch: int,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    sampling: TimeSampling = UNIFORM,
) -> Tensor:
    """Training times in [0, t_max], shape [batch], drawn from `generator` with the density of `sampling`
    (uniform by default: the draws of every run before the option existed, bit for bit)."""
    where = draw_device(generator, device)
    if sampling.name == "uniform":
        u = torch.rand(batch, generator=generator, device=where)
    else:
        u = torch.sigmoid(sampling.loc + sampling.scale * torch.randn(batch, generator=generator, device=where))
    return u.to(device) * t_max


def cfm_loss(model: nn.Module, sample: PathSample, y: Tensor | None = None) -> Tensor:
    """Conditional Flow Matching: || v_theta(x_t, t) - dx_t ||^2, averaged over dimensions.

    Args:
        model: forward(x [B, ...], t [B], y) -> velocity [B, ...].
        sample: a `PathSample` from any path (its x_t, t and dx_t are used).
        y: optional labels [B].
    Returns:
        Loss per sample, [B].
    """
    v = model(sample.x_t, sample.t, y)
    return (v - sample.dx_t).pow(2).flatten(1).mean(1)


def dsm_loss(
    model: nn.Module, path: AffinePath, x_0: Tensor, x_1: Tensor, t: Tensor, y: Tensor | None = None
) -> Tensor:
    """Denoising score matching on the VP SDE (the score-matching baseline of Lipman et al., Table 1).

    The network predicts epsilon, so score = -eps_theta / sigma_t; with the weighting lambda(t) = sigma_t^2
    the DSM objective || sigma_t s_theta + x_0 ||^2 becomes || eps_theta(x_t, t) - x_0 ||^2.
    Train on t < 1 (sigma_1 = 0 on the VP path).

    Args:
        model: forward(x_t [B, ...], t [B], y) -> epsilon [B, ...].
        path: an `AffinePath` with a `VPScheduler`.
        x_0: noise [B, ...]; x_1: data [B, ...]; t: times [B].
    Returns:
        Loss per sample, [B].
    """
    if not isinstance(path.scheduler, VPScheduler):
        raise ValueError(f"dsm_loss needs the VP path; got {type(path.scheduler).__name__}")
    check_pair(x_0, x_1)
    sample = path.sample(x_0, x_1, t)
    eps = model(sample.x_t, t, y)
    return (eps - x_0).pow(2).flatten(1).mean(1)
