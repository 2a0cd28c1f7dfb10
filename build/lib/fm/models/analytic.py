"""Analytic velocity fields with known densities, usable wherever a model is (reference flows for tests)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fm.models.embeddings import check_time


class GaussianOTFlow(nn.Module):
    """The exact marginal velocity of the OT path (sigma_min) for data N(mu, std^2 I) and noise N(0, I).

    The marginal is p_t = N(t mu, S_t^2 I) with S_t^2 = t^2 std^2 + (1 - (1 - sigma_min) t)^2, transported by
    u_t(x) = mu + (S_t S_t' / S_t^2) (x - t mu). At t = 1 its density is N(mu, (std^2 + sigma_min^2) I).
    """

    def __init__(self, mu: float = 0.0, std: float = 1.0, sigma_min: float = 0.0, num_classes: int | None = None):
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be > 0; got {std}")
        self.mu, self.std, self.sigma_min, self.num_classes = mu, std, sigma_min, num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        c = 1.0 - self.sigma_min
        t = check_time(x, t).reshape(-1, *([1] * (x.dim() - 1)))
        var = t**2 * self.std**2 + (1 - c * t) ** 2
        s_ds = t * self.std**2 - c * (1 - c * t)  # S_t S_t'
        return self.mu + s_ds / var * (x - t * self.mu)

    def log_prob_data(self, x: Tensor) -> Tensor:
        """log N(x; mu, (std^2 + sigma_min^2) I) summed per sample, [B]."""
        var = self.std**2 + self.sigma_min**2
        d = x[0].numel()
        return -0.5 * (x - self.mu).flatten(1).pow(2).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)

    def bits_per_dim_exact(self, x_uint8: Tensor) -> Tensor:
        """Exact bits/dim [B] of 8-bit images under this density with the (x + u) / 127.5 - 1 dequantization."""
        normal = torch.distributions.Normal(self.mu, math.sqrt(self.std**2 + self.sigma_min**2))
        x = x_uint8.double()
        cell = normal.cdf((x + 1) / 127.5 - 1) - normal.cdf(x / 127.5 - 1)
        return -torch.log(cell).flatten(1).sum(1) / (x[0].numel() * math.log(2))
