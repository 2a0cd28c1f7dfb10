"""Manifolds for Riemannian Flow Matching (Chen and Lipman 2023): the sphere S^d and the flat torus T^d.

Each manifold gives `projx` (a point onto the manifold), `proju` (an ambient vector onto the tangent space at x),
`expmap`, `logmap`, the geodesic distance `dist`, the uniform prior (`random_uniform`, `uniform_log_prob`) and the
`features` a network reads (the torus is read through cos and sin, so a model is periodic by construction).

Points are stored in the coordinates the data uses: S^d as unit vectors in R^(d+1) [B, d+1], T^d as angles in
[-pi, pi) [B, d]. Tangent vectors live in the same coordinates. Both metrics are the ones the coordinates induce
(the round sphere in R^(d+1), the flat torus), so a tangent vector's norm is its Euclidean norm.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["Manifold", "Sphere", "FlatTorus", "MANIFOLDS", "get_manifold", "wrap"]

_EPS = 1e-12


def wrap(angle: Tensor) -> Tensor:
    """Angles to [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


class Manifold:
    """The interface the Riemannian path, model, sampler and likelihood use."""

    name: str = ""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"manifold dimension must be >= 1; got {dim}")
        self.dim = dim  # intrinsic dimension d

    @property
    def ambient_dim(self) -> int:
        """The coordinates' dimension: d + 1 for S^d, d for T^d."""
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        """The size of `features(x)`."""
        raise NotImplementedError

    def projx(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Geodesic distance [...] between points x, y [..., D]."""
        raise NotImplementedError

    def geodesic(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The geodesic conditional path x_t = exp_{x_0}(t log_{x_0}(x_1)) and its velocity dx_t, both [B, D], for
        endpoints [B, D] and times t [B]."""
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def random_uniform(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None
    ) -> Tensor:
        raise NotImplementedError

    def log_volume(self) -> float:
        raise NotImplementedError

    def uniform_log_prob(self, x: Tensor) -> Tensor:
        """log of the uniform density, -log(volume), [B] for points [B, D]."""
        return torch.full(x.shape[:1], -self.log_volume(), dtype=x.dtype, device=x.device)

    def outside(self, x: Tensor, atol: float = 1e-3) -> tuple[Tensor, str]:
        """(mask [N] of the rows of x [N, D] that are not points of the manifold, what such a row is not)."""
        bad = ~torch.isfinite(x).all(1) | (self.projx(x) - x).abs().amax(1).gt(atol)
        return bad, f"is not on {self.label} (tolerance {atol})"

    def check_points(self, x: Tensor, where: str = "points", atol: float = 1e-3) -> None:
        """Raise ValueError naming the first row that is not a point of the manifold (shape, norm or range)."""
        if x.ndim != 2 or x.shape[1] != self.ambient_dim:
            raise ValueError(f"{where}: points on {self.label} need shape [N, {self.ambient_dim}]; got {list(x.shape)}")
        bad, what = self.outside(x, atol)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{where}: row {i} = {x[i].tolist()} {what}; {bad.sum().item()} such rows of {len(x)}")

    @property
    def label(self) -> str:
        return f"{self.name}{self.dim}"


class Sphere(Manifold):
    """The unit sphere S^d in R^(d+1) with the round metric."""

    name = "sphere"

    @property
    def ambient_dim(self) -> int:
        return self.dim + 1

    @property
    def feature_dim(self) -> int:
        return self.dim + 1

    @property
    def label(self) -> str:
        return f"S^{self.dim}"

    def projx(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        # with the normal x/|x| the projected field is tangent at every x, also off the sphere, so its ambient
        # divergence equals the Riemannian one on the sphere (see `fm.riemannian`)
        n = self.projx(x)
        return u - (n * u).sum(-1, keepdim=True) * n

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        norm = u.norm(dim=-1, keepdim=True)
        direction = u / norm.clamp_min(_EPS)
        return self.projx(torch.cos(norm) * x + torch.sin(norm) * direction)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        u = self.proju(x, y - x)
        return self.dist(x, y)[..., None] * u / u.norm(dim=-1, keepdim=True).clamp_min(_EPS)

    def geodesic(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # the great circle through x_0 with unit tangent e: x_t = cos(t theta) x_0 + sin(t theta) e
        v = self.logmap(x_0, x_1)
        theta = v.norm(dim=-1, keepdim=True)
        e = v / theta.clamp_min(_EPS)
        angle = t[:, None] * theta
        x_t = torch.cos(angle) * x_0 + torch.sin(angle) * e
        dx_t = theta * (torch.cos(angle) * e - torch.sin(angle) * x_0)
        return x_t, dx_t

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        # atan2 of sine and cosine stays accurate near 0 and pi, where arccos of the dot product does not
        cos = (x * y).sum(-1)
        sin = (y - cos[..., None] * x).norm(dim=-1)
        return torch.atan2(sin, cos)

    def features(self, x: Tensor) -> Tensor:
        return self.projx(x)

    def random_uniform(self, n, generator=None, dtype=torch.float32, device=None) -> Tensor:
        return self.projx(torch.randn(n, self.dim + 1, generator=generator, dtype=dtype, device=device))

    def log_volume(self) -> float:
        # area of S^d: 2 pi^((d+1)/2) / Gamma((d+1)/2); 4 pi for S^2
        k = (self.dim + 1) / 2
        return math.log(2.0) + k * math.log(math.pi) - math.lgamma(k)


class FlatTorus(Manifold):
    """The flat torus T^d = [-pi, pi)^d with periodic boundaries and the Euclidean metric."""

    name = "torus"

    @property
    def ambient_dim(self) -> int:
        return self.dim

    @property
    def feature_dim(self) -> int:
        return 2 * self.dim

    @property
    def label(self) -> str:
        return f"T^{self.dim}"

    def projx(self, x: Tensor) -> Tensor:
        return wrap(x)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return wrap(x + u)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return wrap(y - x)

    def geodesic(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        v = wrap(x_1 - x_0)  # the shortest way round in every angle
        return wrap(x_0 + t[:, None] * v), v

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return wrap(y - x).norm(dim=-1)

    def features(self, x: Tensor) -> Tensor:
        return torch.cat([torch.cos(x), torch.sin(x)], -1)

    def random_uniform(self, n, generator=None, dtype=torch.float32, device=None) -> Tensor:
        return (torch.rand(n, self.dim, generator=generator, dtype=dtype, device=device) * 2 - 1) * math.pi

    def log_volume(self) -> float:
        return self.dim * math.log(2 * math.pi)

    def outside(self, x: Tensor, atol: float = 1e-3) -> tuple[Tensor, str]:
        # any finite angle is a point of the torus; stored rows are in [-pi, pi]
        return ~torch.isfinite(x).all(1) | x.abs().amax(1).gt(math.pi + atol), "is not an angle vector in [-pi, pi]"


MANIFOLDS: dict[str, type[Manifold]] = {"sphere": Sphere, "torus": FlatTorus}


@functools.lru_cache(maxsize=32)
def get_manifold(spec: str) -> Manifold:
    """A manifold from its spec "sphere2" / "torus2" (name and intrinsic dimension); raises ValueError naming what
    is allowed."""
    name = spec.rstrip("0123456789")
    digits = spec[len(name) :]
    if name not in MANIFOLDS or not digits or int(digits) < 1:
        raise ValueError(
            f"unknown manifold {spec!r}; allowed: {', '.join(k + 'D' for k in MANIFOLDS)} with D >= 1 "
            "(e.g. sphere2, torus2)"
        )
    return MANIFOLDS[name](int(digits))
