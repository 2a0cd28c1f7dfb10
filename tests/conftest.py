import math

import pytest
import torch


class GaussianOTField:
    """The exact marginal velocity of the OT path (sigma_min) for data N(mu, s^2 I) and noise N(0, I).

    The marginal is p_t = N(t mu, S_t^2 I) with S_t^2 = t^2 s^2 + (1 - (1 - sigma_min) t)^2, and the linear field
    u_t(x) = mu + S_t'/S_t (x - t mu) transports it.
    """

    def __init__(self, mu: float, s: float, sigma_min: float = 0.0):
        self.mu, self.s, self.sigma_min = mu, s, sigma_min

    def std(self, t):
        c = 1 - self.sigma_min
        return torch.sqrt(t**2 * self.s**2 + (1 - c * t) ** 2)

    def __call__(self, x, t):
        c = 1 - self.sigma_min
        t = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        var = t**2 * self.s**2 + (1 - c * t) ** 2
        d_var_half = t * self.s**2 - c * (1 - c * t)  # S S'
        return self.mu + d_var_half / var * (x - t * self.mu)

    def log_prob_data(self, x):
        var = self.s**2 + self.sigma_min**2
        d = x[0].numel()
        return -0.5 * (x - self.mu).flatten(1).pow(2).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)


@pytest.fixture
def gaussian_field():
    return GaussianOTField(mu=1.5, s=0.5, sigma_min=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
