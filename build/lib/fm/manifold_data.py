"""Toy data on manifolds with exact log-densities: a von Mises-Fisher mixture on S^2 and a wrapped-normal mixture
on the torus T^2 laid out like protein backbone dihedral angles (phi, psi).

`sample_manifold_set(name, n, generator)` returns points [n, D] in the manifold's coordinates (unit vectors in
R^3, angles in [-pi, pi)); `manifold_set_log_prob(name, x)` the exact log-density [n] with respect to the
manifold's volume (area on S^2, d phi d psi on T^2); `manifold_set_entropy` the differential entropy in nats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fm.manifolds import Manifold, get_manifold, wrap

__all__ = ["MANIFOLD_SETS", "manifold_of", "sample_manifold_set", "manifold_set_log_prob", "manifold_set_entropy"]

# von Mises-Fisher mixture on S^2: unit mean directions (normalised below), concentrations kappa, weights
_VMF_MEANS = ((1.0, 0.0, 0.3), (-0.5, 0.8, 0.0), (-0.3, -0.6, 0.75), (0.0, 0.2, -1.0))
_VMF_KAPPA = (25.0, 40.0, 15.0, 60.0)
_VMF_WEIGHTS = (0.3, 0.25, 0.25, 0.2)
# wrapped normals on T^2 (phi, psi), diagonal: the right-handed helix, the beta sheet (close to psi = pi, so its
# mass wraps round) and the left-handed helix, as in a Ramachandran plot
_WN_MEANS = ((-1.1, -0.75), (-2.1, 2.5), (1.0, 0.6))
_WN_STDS = ((0.25, 0.3), (0.4, 0.35), (0.3, 0.3))
_WN_WEIGHTS = (0.45, 0.4, 0.15)
_WRAPS = 3  # images of the density summed over k in [-3, 3] per angle: exact to < 1e-30 for these stds

MANIFOLD_SETS = {"vmf-mixture": "sphere2", "dihedral": "torus2"}


def _check(name: str) -> None:
    if name not in MANIFOLD_SETS:
        raise ValueError(f"unknown manifold data set {name!r}; allowed: {', '.join(MANIFOLD_SETS)}")


def manifold_of(name: str) -> Manifold:
    """The manifold a set lives on."""
    _check(name)
    return get_manifold(MANIFOLD_SETS[name])


def _vmf_params() -> tuple[Tensor, Tensor, Tensor]:
    mu = torch.tensor(_VMF_MEANS, dtype=torch.float64)
    return (
        mu / mu.norm(dim=1, keepdim=True),
        torch.tensor(_VMF_KAPPA, dtype=torch.float64),
        torch.tensor(_VMF_WEIGHTS, dtype=torch.float64),
    )


def _sample_vmf_s2(mu: Tensor, kappa: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of mu [n, 3] and kappa [n] (Wood's method on S^2, where w has a closed-form inverse CDF)."""
    n = mu.shape[0]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    # w = mu . x has density proportional to exp(kappa w) on [-1, 1]
    w = 1 + torch.log(u + (1 - u) * torch.exp(-2 * kappa)) / kappa
    phi = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    # an orthonormal pair (e1, e2) perpendicular to mu
    helper = torch.where(
        mu[:, :1].abs() < 0.9,
        torch.tensor([1.0, 0, 0], dtype=torch.float64),
        torch.tensor([0, 1.0, 0], dtype=torch.float64),
    )
    e1 = helper - (helper * mu).sum(1, keepdim=True) * mu
    e1 = e1 / e1.norm(dim=1, keepdim=True)
    e2 = torch.linalg.cross(mu, e1)
    r = torch.sqrt((1 - w * w).clamp_min(0))[:, None]
    return w[:, None] * mu + r * (torch.cos(phi)[:, None] * e1 + torch.sin(phi)[:, None] * e2)


def sample_manifold_set(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw n points [n, D] (float32) from a manifold set."""
    _check(name)
    if n < 1:
        raise ValueError(f"number of samples must be >= 1; got {n}")
    if name == "vmf-mixture":
        mu, kappa, weights = _vmf_params()
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        return _sample_vmf_s2(mu[k], kappa[k], generator).float()
    means, stds = torch.tensor(_WN_MEANS, dtype=torch.float64), torch.tensor(_WN_STDS, dtype=torch.float64)
    k = torch.multinomial(torch.tensor(_WN_WEIGHTS, dtype=torch.float64), n, replacement=True, generator=generator)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return wrap(means[k] + stds[k] * z).float()


def manifold_set_log_prob(name: str, x: Tensor) -> Tensor:
    """Exact log-density [n] (float64) at points x [n, D] with respect to the manifold's volume."""
    _check(name)
    x = x.double()
    if name == "vmf-mixture":
        mu, kappa, weights = _vmf_params()
        x = x / x.norm(dim=1, keepdim=True)
        # vMF on S^2: kappa / (2 pi (1 - exp(-2 kappa))) exp(kappa (mu . x - 1)), stable for large kappa
        log_c = torch.log(kappa) - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2 * kappa))
        log_comp = log_c + kappa * (x @ mu.T - 1)  # [n, K]
        return torch.logsumexp(log_comp + torch.log(weights), 1)
    means, stds = torch.tensor(_WN_MEANS, dtype=torch.float64), torch.tensor(_WN_STDS, dtype=torch.float64)
    shifts = 2 * math.pi * torch.arange(-_WRAPS, _WRAPS + 1, dtype=torch.float64)
    d = wrap(x[:, None, :] - means[None])[..., None] + shifts  # [n, K, 2, wraps]
    log_1d = (
        -0.5 * (d / stds[None, :, :, None]).pow(2) - torch.log(stds)[None, :, :, None] - 0.5 * math.log(2 * math.pi)
    )
    log_comp = torch.logsumexp(log_1d, 3).sum(2)  # [n, K]: product of the two wrapped normals
    return torch.logsumexp(log_comp + torch.log(torch.tensor(_WN_WEIGHTS, dtype=torch.float64)), 1)


def manifold_set_entropy(name: str, n: int = 400_000, seed: int = 0) -> tuple[float, float]:
    """Differential entropy -E[log p(x)] in nats, by Monte Carlo with the exact density: (value, standard error)."""
    lp = manifold_set_log_prob(name, sample_manifold_set(name, n, torch.Generator().manual_seed(seed)))
    return -lp.mean().item(), (lp.std() / math.sqrt(n)).item()
