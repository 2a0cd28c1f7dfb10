"""Toy 2-D data sets with samplers and, where one exists in closed form, the exact log-density.

`sample_toy(name, n, generator)` returns [n, 2]; `toy_log_prob(name, x)` returns [n] or raises when the set
has no closed-form density (moons and spirals are defined by a noisy curve, whose density is not closed form).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "TOY_SETS",
    "TOY_DENSITIES",
    "gaussian_centres",
    "sample_toy",
    "toy_log_prob",
    "toy_entropy",
    "to_model_space",
    "to_uint8",
]

TOY_SETS = ("8gaussians", "moons", "checkerboard", "rings", "spirals")
TOY_DENSITIES = ("8gaussians", "checkerboard", "rings")

# 8 Gaussians: equal mixture of N(c_k, s^2 I) with centres on a circle (FFJORD's layout, scale 4 / sqrt 2).
_G_RADIUS, _G_STD = 4.0 / math.sqrt(2.0), 0.5 / math.sqrt(2.0)
# Rings: radius r_k + s * z with z ~ N(0, 1) and a uniform angle.
_RING_RADII, _RING_STD = (0.75, 1.5, 2.25, 3.0), 0.08


def gaussian_centres(device=None) -> Tensor:
    """The 8 centres of the 8gaussians set, [8, 2] float64."""
    ang = torch.arange(8, device=device, dtype=torch.float64) * (2 * math.pi / 8)
    return _G_RADIUS * torch.stack([torch.cos(ang), torch.sin(ang)], 1)


def _check(name: str) -> None:
    if name not in TOY_SETS:
        raise ValueError(f"unknown toy data set {name!r}; allowed: {', '.join(TOY_SETS)}")


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw n points [n, 2] (float32) from a toy set."""
    _check(name)
    if n < 1:
        raise ValueError(f"number of samples must be >= 1; got {n}")
    g = generator

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g)
        x = gaussian_centres()[k] + _G_STD * randn(n, 2)
    elif name == "checkerboard":
        # 8 unit squares on [-2, 2]^2: x in [-2, 2), y in a square whose row parity matches floor(x)'s
        x1 = rand(n) * 4 - 2
        row = torch.randint(0, 2, (n,), generator=g).double() * 2  # 0 or 2
        x2 = rand(n) - row + (torch.floor(x1) % 2)
        x = torch.stack([x1, x2], 1)
    elif name == "rings":
        k = torch.randint(0, len(_RING_RADII), (n,), generator=g)
        r = torch.tensor(_RING_RADII, dtype=torch.float64)[k] + _RING_STD * randn(n)
        ang = rand(n) * 2 * math.pi
        x = torch.stack([r * torch.cos(ang), r * torch.sin(ang)], 1)
    elif name == "moons":
        ang = rand(n) * math.pi
        upper = torch.randint(0, 2, (n,), generator=g).bool()
        x = torch.where(
            upper[:, None],
            torch.stack([torch.cos(ang), torch.sin(ang)], 1),
            torch.stack([1 - torch.cos(ang), 0.5 - torch.sin(ang)], 1),
        )
        x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 2 + 0.1 * randn(n, 2)
    else:  # spirals
        u = torch.sqrt(rand(n)) * 3 * math.pi
        arm = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        x = arm[:, None] * torch.stack([u * torch.cos(u), u * torch.sin(u)], 1) / 3 + 0.1 * randn(n, 2)
    return x.float()


def toy_log_prob(name: str, x: Tensor) -> Tensor:
    """Exact log-density [n] at points x [n, 2] (float64), for the sets in TOY_DENSITIES."""
    _check(name)
    x = x.double()
    if name == "8gaussians":
        d2 = (x[:, None, :] - gaussian_centres(x.device)[None]).pow(2).sum(-1)  # [n, 8]
        log_comp = -d2 / (2 * _G_STD**2) - math.log(2 * math.pi * _G_STD**2)
        return torch.logsumexp(log_comp, 1) - math.log(8)
    if name == "checkerboard":
        inside = (x[:, 0] >= -2) & (x[:, 0] < 2) & (x[:, 1] >= -2) & (x[:, 1] < 2)
        parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2 == 0
        return torch.where(
            inside & parity, torch.full_like(x[:, 0], -math.log(8.0)), torch.full_like(x[:, 0], -math.inf)
        )
    if name == "rings":
        # density of r times the uniform angle's 1 / (2 pi r); negative radii (P < 1e-20) are ignored
        r = x.norm(dim=1).clamp_min(1e-12)
        radii = torch.tensor(_RING_RADII, dtype=torch.float64, device=x.device)
        log_r = -(r[:, None] - radii).pow(2) / (2 * _RING_STD**2) - 0.5 * math.log(2 * math.pi * _RING_STD**2)
        return torch.logsumexp(log_r, 1) - math.log(len(_RING_RADII)) - torch.log(2 * math.pi * r)
    raise ValueError(f"toy set {name!r} has no closed-form density; sets with one: {', '.join(TOY_DENSITIES)}")


def toy_entropy(name: str, n: int = 200_000, generator: torch.Generator | None = None) -> float:
    """Differential entropy (nats) -E[log p(x)]: exact for the checkerboard (log 8), Monte Carlo otherwise."""
    if name == "checkerboard":
        return math.log(8.0)
    return -toy_log_prob(name, sample_toy(name, n, generator)).mean().item()


def to_model_space(x_uint8: Tensor) -> Tensor:
    """8-bit pixels [B, C, H, W] (values 0..255) to model space [-1, 1]: x / 127.5 - 1 (float32)."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Model-space images back to 8-bit pixels, rounded and clamped to 0..255 (uint8)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
