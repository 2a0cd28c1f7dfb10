"""Training losses. Each returns per-sample values of shape [B]; the caller reduces."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fm.paths import AffinePath, PathSample, VPScheduler, check_pair
from fm.seeding import draw_device

__all__ = ["cfm_loss", "dsm_loss", "sample_time"]


def sample_time(batch: int, t_max: float = 1.0, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """Uniform training times in [0, t_max], shape [batch]."""
    return torch.rand(batch, generator=generator, device=draw_device(generator, device)).to(device) * t_max


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


def dsm_loss(model: nn.Module, path: AffinePath, x_0: Tensor, x_1: Tensor, t: Tensor,
             y: Tensor | None = None) -> Tensor:
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
