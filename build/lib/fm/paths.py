"""Probability paths: schedulers (alpha_t, sigma_t and derivatives), affine Gaussian paths and general paths.

Convention: t = 0 is noise (x_0), t = 1 is data (x_1). A Gaussian path is x_t = alpha_t x_1 + sigma_t x_0 with
x_0 ~ N(0, I); its conditional target is dx_t = d_alpha_t x_1 + d_sigma_t x_0 (Lipman et al. 2022, eq. 15).
The Flow Matching talk this project follows writes time the other way round (t = 0 data).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fm.seeding import draw_device

__all__ = [
    "PathSample",
    "SchedulerOutput",
    "Scheduler",
    "CondOTScheduler",
    "VPScheduler",
    "VEScheduler",
    "CosineScheduler",
    "PolynomialScheduler",
    "AffinePath",
    "NoisyLinearPath",
    "GeneralPath",
    "PREDICTIONS",
    "SCHEDULERS",
    "PATHS",
    "PathSpec",
    "make_path",
    "check_pair",
]


@dataclass
class PathSample:
    """A draw from a conditional probability path.

    Attributes:
        x_0: noise, shape [B, ...].
        x_1: data, shape [B, ...].
        t: times, shape [B].
        x_t: the point on the path, shape [B, ...].
        dx_t: the conditional target velocity d/dt x_t, shape [B, ...].
    """

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor
    dx_t: Tensor


@dataclass
class SchedulerOutput:
    """alpha_t, sigma_t and their time derivatives, each of shape [B]."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a [B] tensor to broadcast against [B, ...]."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def check_t(t: Tensor, batch: int | None = None) -> None:
    """Raise a clear error unless t is a [B] tensor of times in [0, 1]."""
    if not torch.is_tensor(t) or t.dim() != 1:
        shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"t must be a 1-D tensor of shape [B]; got {shape}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"t has {t.shape[0]} entries but the batch has {batch} samples")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"t must lie in [0, 1]; got values in [{t.min().item():.4g}, {t.max().item():.4g}]")


def check_pair(x_0: Tensor, x_1: Tensor) -> None:
    """Raise a clear error unless x_0 and x_1 have the same shape [B, ...]."""
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape; got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
    if x_0.dim() < 2:
        raise ValueError(f"x_0 and x_1 must be batched as [B, ...] with at least 2 dims; got {tuple(x_0.shape)}")


class Scheduler(ABC):
    """alpha_t, sigma_t of a Gaussian path x_t = alpha_t x_1 + sigma_t x_0, with derivatives."""

    @abstractmethod
    def __call__(self, t: Tensor) -> SchedulerOutput:
        """Evaluate the schedule at times t of shape [B]."""


class CondOTScheduler(Scheduler):
    """Lipman's OT path: alpha_t = t, sigma_t = 1 - (1 - sigma_min) t."""

    def __init__(self, sigma_min: float = 0.0):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1); got {sigma_min}")
        self.sigma_min = sigma_min

    def __call__(self, t: Tensor) -> SchedulerOutput:
        c = 1.0 - self.sigma_min
        return SchedulerOutput(t, 1.0 - c * t, torch.ones_like(t), torch.full_like(t, -c))


class VPScheduler(Scheduler):
    """The variance-preserving diffusion path written as a flow path (Lipman et al. eq. 19).

    With T(s) = int_0^s beta(r) dr and beta(r) = beta_min + r (beta_max - beta_min):
    alpha_t = exp(-T(1 - t) / 2), sigma_t = sqrt(1 - alpha_t^2). At t = 0, alpha_0 = exp(-T(1)/2) is small but
    not 0 (0.0066 for the defaults), and at t = 1 sigma_t = 0, where d_sigma_t diverges: train on t < 1.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max; got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, s: Tensor) -> Tensor:
        """beta(s) in the diffusion's own time s = 1 - t, shape [B]."""
        return self.beta_min + s * (self.beta_max - self.beta_min)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        s = 1.0 - t
        big_t = s * self.beta_min + 0.5 * s**2 * (self.beta_max - self.beta_min)
        alpha_t = torch.exp(-0.5 * big_t)
        sigma_t = torch.sqrt(-torch.expm1(-big_t))  # 1 - alpha^2 without cancellation near t = 1
        d_alpha_t = 0.5 * self.beta(s) * alpha_t
        d_sigma_t = -alpha_t * d_alpha_t / sigma_t
        return SchedulerOutput(alpha_t, sigma_t, d_alpha_t, d_sigma_t)


class VEScheduler(Scheduler):
    """Variance exploding path: alpha_t = 1, sigma_t = sigma_min (sigma_max / sigma_min)^(1 - t).

    The noise end has scale sigma_max, so sample x_0 ~ N(0, sigma_max^2 I) rather than N(0, I) with it.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, t: Tensor) -> SchedulerOutput:
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        sigma_t = self.sigma_min * torch.exp((1.0 - t) * log_ratio)
        return SchedulerOutput(torch.ones_like(t), sigma_t, torch.zeros_like(t), -log_ratio * sigma_t)


class CosineScheduler(Scheduler):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def __call__(self, t: Tensor) -> SchedulerOutput:
        h = 0.5 * math.pi
        return SchedulerOutput(torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t))


class PolynomialScheduler(Scheduler):
    """alpha_t = t^n, sigma_t = 1 - t^n."""

    def __init__(self, n: float = 2.0):
        if n <= 0:
            raise ValueError(f"polynomial exponent n must be > 0; got {n}")
        self.n = n

    def __call__(self, t: Tensor) -> SchedulerOutput:
        d = self.n * t.pow(self.n - 1)
        return SchedulerOutput(t.pow(self.n), 1.0 - t.pow(self.n), d, -d)


PREDICTIONS = ("velocity", "x_1", "epsilon", "score")


class AffinePath:
    """Gaussian path x_t = alpha_t x_1 + sigma_t x_0, and conversions between what a model may predict.

    For x_0 ~ N(0, I) the marginal field satisfies v = d_alpha E[x_1|x_t] + d_sigma E[x_0|x_t] and
    score = -E[x_0|x_t] / sigma_t, so velocity, x_1-prediction, epsilon-prediction and score are
    interchangeable given (x_t, t).
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> PathSample:
        """Draw x_t and the conditional target dx_t (deterministic given x_0, x_1, t; `generator` is unused).

        Args:
            x_0: noise, [B, ...]. x_1: data, [B, ...]. t: times in [0, 1], [B].
        """
        check_pair(x_0, x_1)
        check_t(t, x_0.shape[0])
        s = self.scheduler(t)
        a, sg, da, dsg = (_expand(v, x_1) for v in (s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t))
        return PathSample(x_0, x_1, t, a * x_1 + sg * x_0, da * x_1 + dsg * x_0)

    def _coeffs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = self.scheduler(t)
        return (_expand(s.alpha_t, x_t), _expand(s.sigma_t, x_t), _expand(s.d_alpha_t, x_t), _expand(s.d_sigma_t, x_t))

    def to_epsilon(self, pred: Tensor, kind: str, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert a prediction of the given kind to E[x_0 | x_t] (epsilon), shape of x_t."""
        a, sg, da, dsg = self._coeffs(x_t, t)
        if kind == "epsilon":
            return pred
        if kind == "score":
            return -sg * pred
        if kind == "x_1":
            return (x_t - a * pred) / sg
        if kind == "velocity":
            # v = da x_1 + dsg x_0 and x_t = a x_1 + sg x_0  =>  x_0 = (a v - da x_t) / (a dsg - da sg)
            return (a * pred - da * x_t) / (a * dsg - da * sg)
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(PREDICTIONS)}")

    def from_epsilon(self, eps: Tensor, kind: str, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert E[x_0 | x_t] to a prediction of the given kind, shape of x_t."""
        a, sg, da, dsg = self._coeffs(x_t, t)
        if kind == "epsilon":
            return eps
        if kind == "score":
            return -eps / sg
        x_1 = (x_t - sg * eps) / a
        if kind == "x_1":
            return x_1
        if kind == "velocity":
            return da * x_1 + dsg * eps
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(PREDICTIONS)}")

    def convert(self, pred: Tensor, source: str, target: str, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert between "velocity", "x_1", "epsilon" and "score" predictions at (x_t, t)."""
        for kind in (source, target):
            if kind not in PREDICTIONS:
                raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(PREDICTIONS)}")
        if source == target:
            return pred
        if source == "velocity" and target == "x_1":
            # Direct form avoids dividing by alpha_t, which is 0 at t = 0 on the OT path.
            a, sg, da, dsg = self._coeffs(x_t, t)
            return (sg * pred - dsg * x_t) / (sg * da - dsg * a)
        return self.from_epsilon(self.to_epsilon(pred, source, x_t, t), target, x_t, t)


class NoisyLinearPath:
    """Straight line between a coupled pair with Gaussian noise: the paths of I-CFM and SB-CFM (Tong et al.).

    x_t = t x_1 + (1 - t) x_0 + sigma_t eps with sigma_t = sigma ("constant", I-CFM) or
    sigma sqrt(t (1 - t)) ("brownian", the Brownian bridge of SB-CFM); dx_t = x_1 - x_0 + d_sigma_t eps.
    """

    def __init__(self, sigma: float = 0.0, noise: str = "constant"):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0; got {sigma}")
        if noise not in ("constant", "brownian"):
            raise ValueError(f"unknown noise {noise!r}; allowed: constant, brownian")
        self.sigma, self.noise = sigma, noise

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> PathSample:
        """Draw x_t and dx_t; the path noise eps ~ N(0, I) [B, ...] comes from `generator`."""
        check_pair(x_0, x_1)
        check_t(t, x_0.shape[0])
        te = _expand(t, x_1)
        x_t, dx_t = te * x_1 + (1 - te) * x_0, x_1 - x_0
        if self.sigma > 0:
            eps = torch.randn(
                x_0.shape, generator=generator, device=draw_device(generator, x_0.device), dtype=x_0.dtype
            ).to(x_0.device)
            if self.noise == "constant":
                x_t = x_t + self.sigma * eps
            else:
                # d/dt sqrt(t(1-t)) diverges at the ends; the clamp keeps the target finite there.
                tc = te.clamp(1e-5, 1 - 1e-5)
                root = torch.sqrt(tc * (1 - tc))
                x_t = x_t + self.sigma * root * eps
                dx_t = dx_t + self.sigma * (1 - 2 * tc) / (2 * root) * eps
        return PathSample(x_0, x_1, t, x_t, dx_t)


class GeneralPath:
    """A non-Gaussian path x_t = T_t(x_0, x_1) given by any differentiable map; dx_t by forward-mode autodiff."""

    def __init__(self, transform: Callable[[Tensor, Tensor, Tensor], Tensor]):
        """transform(x_0 [B, ...], x_1 [B, ...], t [B]) -> x_t [B, ...]."""
        self.transform = transform

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> PathSample:
        """Draw x_t = T_t(x_0, x_1) and dx_t [B, ...] (deterministic; `generator` is unused)."""
        check_pair(x_0, x_1)
        check_t(t, x_0.shape[0])
        x_t, dx_t = torch.func.jvp(lambda tt: self.transform(x_0, x_1, tt), (t,), (torch.ones_like(t),))[:2]
        return PathSample(x_0, x_1, t, x_t, dx_t)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "ot": CondOTScheduler,
    "vp": VPScheduler,
    "ve": VEScheduler,
    "cosine": CosineScheduler,
    "polynomial": PolynomialScheduler,
}


@dataclass(frozen=True)
class PathSpec:
    """A registered probability path: its label in tables and docs, how to build it, and which method parameters
    (`fm.methods.MethodParams` fields) the builder takes."""

    label: str
    build: Callable[..., AffinePath | NoisyLinearPath]
    params: tuple[str, ...] = ()


# The one place to add a path: an entry here, then a method preset in fm.methods.METHODS that uses it.
PATHS: dict[str, PathSpec] = {
    "ot": PathSpec("OT (sigma_min)", lambda sigma_min=0.0: AffinePath(CondOTScheduler(sigma_min)), ("sigma_min",)),
    "vp": PathSpec(
        "VP diffusion",
        lambda beta_min=0.1, beta_max=20.0: AffinePath(VPScheduler(beta_min, beta_max)),
        ("beta_min", "beta_max"),
    ),
    "ve": PathSpec("VE diffusion", lambda **kw: AffinePath(VEScheduler(**kw))),
    "cosine": PathSpec("cosine", lambda: AffinePath(CosineScheduler())),
    "polynomial": PathSpec("polynomial", lambda **kw: AffinePath(PolynomialScheduler(**kw))),
    "straight": PathSpec("straight line", lambda sigma=0.0: NoisyLinearPath(sigma), ("sigma",)),
    "brownian": PathSpec("Brownian bridge", lambda sigma=1.0: NoisyLinearPath(sigma, "brownian"), ("sigma",)),
}


def make_path(name: str, **kwargs) -> AffinePath | NoisyLinearPath:
    """Build a registered path by name (see `PATHS`), e.g. make_path("ot", sigma_min=1e-4)."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; allowed: {', '.join(PATHS)}")
    return PATHS[name].build(**kwargs)
