"""Couplings q(x_0, x_1) for Conditional Flow Matching (Tong et al. 2023).

A coupling re-pairs a minibatch of noise x_0 [B, ...] with data x_1 [B, ...] (any shape: samples are flattened
for the cost). Labels y [B] travel with x_1. `GlobalOTCoupling` solves one plan over the batches of all
torch.distributed ranks, which no per-worker solve can give.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fm.paths import check_pair
from fm.seeding import seeded_generator

__all__ = [
    "Coupling",
    "IndependentCoupling",
    "ExactOTCoupling",
    "EntropicOTCoupling",
    "GlobalOTCoupling",
    "GivenCoupling",
    "COUPLINGS",
    "CouplingSpec",
    "make_coupling",
    "squared_cost",
    "sinkhorn_log",
]


def squared_cost(x_0: Tensor, x_1: Tensor) -> Tensor:
    """Squared Euclidean distances between flattened samples, [B0, B1]."""
    return torch.cdist(x_0.flatten(1).double(), x_1.flatten(1).double()).pow(2)


class Coupling:
    """Base: pair x_0 and x_1 (and x_1's labels). Independent pairing keeps the given order."""

    last_solve_seconds: float = 0.0

    def plan_indices(self, x_0: Tensor, x_1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Return index tensors (i, j), each [B]: x_0[i] is paired with x_1[j]. A random plan draws its pairs
        from `generator` (so a training step's pairing depends only on the step's seed)."""
        idx = torch.arange(x_0.shape[0], device=x_0.device)
        return idx, idx

    def __call__(
        self, x_0: Tensor, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return the re-paired (x_0, x_1, y)."""
        check_pair(x_0, x_1)
        start = time.perf_counter()
        i, j = self.plan_indices(x_0, x_1, generator)
        self.last_solve_seconds = time.perf_counter() - start
        return x_0[i], x_1[j], (None if y is None else y[j])


class IndependentCoupling(Coupling):
    """q(x_0, x_1) = q(x_0) q(x_1): I-CFM."""


class GivenCoupling(Coupling):
    """The pairs as they come: each x_0 with the x_1 it was made into (Rectified Flow's reflow, where x_1 is the
    trained flow's ODE solution from x_0). It draws no noise: the pairs come with the data."""


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


class ExactOTCoupling(Coupling):
    """Minibatch exact OT on squared Euclidean cost (POT's network simplex): OT-CFM.

    With equal uniform marginals the optimal plan is a permutation, so each x_0 keeps exactly one partner. With
    unequal counts (snapshots of two times) the plan between the uniform marginals splits rows' mass: max(B0, B1)
    pairs are drawn from it by systematic sampling (one uniform offset from `generator`), so each entry of the plan
    gives about its share of the pairs and every row of either side is used in proportion to its marginal, where
    keeping each row's largest partner would leave some rows of the larger side out altogether.
    """

    def plan_indices(self, x_0: Tensor, x_1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        import ot  # here, not at the top: see `fm.metrics.w2_from_cost`

        cost = squared_cost(x_0, x_1).cpu().numpy()
        n_0, n_1 = cost.shape
        plan = ot.emd(_uniform(n_0), _uniform(n_1), cost, numItermax=10_000_000)
        if n_0 != n_1:
            return _systematic_pairs(torch.from_numpy(plan), max(n_0, n_1), generator, x_0.device)
        j = torch.from_numpy(plan.argmax(axis=1)).to(x_0.device)
        return torch.arange(n_0, device=x_0.device), j


def _systematic_pairs(
    plan: Tensor, count: int, generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """`count` pairs (i, j) from a plan [B0, B1] by systematic resampling: points (u + m) / count, m < count, of one
    uniform u, located in the plan's cumulative mass; an entry of mass w gets floor or ceil of w * count pairs."""
    u = torch.rand(1, generator=generator, device=generator.device if generator is not None else "cpu").cpu()
    cum = torch.cumsum(plan.flatten().double(), 0)
    points = (u.double() + torch.arange(count, dtype=torch.float64)) / count * cum[-1]
    flat = torch.searchsorted(cum, points, right=True).clamp(max=cum.numel() - 1)
    return (flat // plan.shape[1]).to(device), (flat % plan.shape[1]).to(device)


# exp(-cost / reg) is used directly while cost / reg stays below this: kernel entries >= e^-200 ~ 1e-87 and scaling
# vectors below ~1e87 are far inside float64's range, so nothing under- or overflows.
_KERNEL_RANGE = 200.0


def sinkhorn_log(
    cost: Tensor, reg: float, tol: float = 1e-4, max_iter: int = 2000, check_every: int = 5
) -> tuple[Tensor, int, float]:
    """Entropic OT between uniform marginals by Sinkhorn iterations, run until converged.

    Args:
        cost: [B0, B1] cost matrix (float64).
        reg: the entropic regularisation epsilon (> 0).
        tol: stop once the row marginals are within `tol` in L1 (the column marginals are exact after each
            iteration); checked every `check_every` iterations.
    Returns:
        (log_plan [B0, B1], iterations, L1 marginal error). The plan sums to one.

    Where the kernel exp(-cost / reg) is representable (cost / reg below `_KERNEL_RANGE` after shifting by the
    smallest cost) the iterations are matrix-vector products; otherwise (a small reg against the cost of large
    images) they run in the log domain, which never underflows. Both are the same fixed point. Stopping on the
    marginal error rather than a fixed iteration count is what makes the solve cheap where it converges fast.
    """
    n, m = cost.shape
    scaled = (cost - cost.min()) / reg
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
    if scaled.max().item() < _KERNEL_RANGE:
        kernel = torch.exp(-scaled)
        v, err, it = torch.ones_like(b), math.inf, 0
        for it in range(1, max_iter + 1):
            u = a / (kernel @ v)
            v = b / (kernel.T @ u)
            if it % check_every == 0 or it == max_iter:
                err = ((u * (kernel @ v)) - a).abs().sum().item()
                if err < tol:
                    break
        return torch.log(u)[:, None] - scaled + torch.log(v)[None, :], it, err
    log_a, log_b = a.log(), b.log()
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    err, it = math.inf, 0
    for it in range(1, max_iter + 1):
        f = log_a - torch.logsumexp(g[None, :] - scaled, dim=1)
        g = log_b - torch.logsumexp(f[:, None] - scaled, dim=0)
        if it % check_every == 0 or it == max_iter:
            err = (torch.logsumexp(f[:, None] - scaled + g[None, :], dim=1).exp() - a).abs().sum().item()
            if err < tol:
                break
    return f[:, None] - scaled + g[None, :], it, err


class EntropicOTCoupling(Coupling):
    """Entropic OT on squared Euclidean cost with regularisation reg; pairs are drawn from the plan: SB-CFM.

    With `NoisyLinearPath(sigma, "brownian")` and reg = 2 sigma^2 this samples the Schrödinger bridge. The plan
    comes from `sinkhorn_log` (log domain, stopped on its marginal error `tol`); the iterations and the error of the
    last solve are kept in `last_iterations` and `last_marginal_error`. Pairs are drawn from the generator passed
    to the call (else the one given here, else torch's global generator).
    """

    def __init__(
        self, reg: float = 0.5, generator: torch.Generator | None = None, tol: float = 1e-4, max_iter: int = 2000
    ):
        if reg <= 0:
            raise ValueError(f"entropic regularisation reg must be > 0; got {reg}")
        self.reg, self.generator, self.tol, self.max_iter = reg, generator, tol, max_iter
        self.last_iterations, self.last_marginal_error = 0, math.inf

    def plan_indices(self, x_0: Tensor, x_1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        cost = squared_cost(x_0, x_1).cpu()
        log_plan, self.last_iterations, self.last_marginal_error = sinkhorn_log(cost, self.reg, self.tol, self.max_iter)
        p = log_plan.flatten().exp()
        if not torch.isfinite(p).all() or p.sum() <= 0:
            raise FloatingPointError(f"Sinkhorn produced an invalid plan with reg={self.reg}; increase reg")
        g = generator if generator is not None else self.generator
        if g is not None and g.device.type != "cpu":  # the plan lives on the CPU; derive a CPU generator from g
            g = seeded_generator(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))
        flat = torch.multinomial(p / p.sum(), x_0.shape[0], replacement=True, generator=g)
        n1 = cost.shape[1]
        return (flat // n1).to(x_0.device), (flat % n1).to(x_0.device)


class GlobalOTCoupling(Coupling):
    """Exact OT over the global batch of all torch.distributed ranks.

    Every rank gathers x_0, x_1 (and y) from all ranks, rank 0 solves one plan over the W*B pairs, the
    permutation is broadcast, and each rank keeps its own x_0 rows with their globally matched x_1 partners.
    Outside an initialised process group it is exactly `ExactOTCoupling`.

    `group`: a process group of its own (gloo) for the gathers, so that the pairing can run in a thread beside the
    training step's gradient all-reduce on the default group; its collectives go through CPU copies.
    """

    def __init__(self, group=None):
        self._local, self.group = ExactOTCoupling(), group

    def __call__(
        self, x_0: Tensor, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            out = self._local(x_0, x_1, y)
            self.last_solve_seconds = self._local.last_solve_seconds
            return out
        check_pair(x_0, x_1)
        world, rank, b = dist.get_world_size(), dist.get_rank(), x_0.shape[0]
        device = x_0.device
        if self.group is not None:  # the group's collectives take CPU tensors
            x_0, x_1, y = x_0.cpu(), x_1.cpu(), (None if y is None else y.cpu())
        all_x0, all_x1 = _all_gather(x_0, world, self.group), _all_gather(x_1, world, self.group)
        all_y = _all_gather(y, world, self.group) if y is not None else None
        j = torch.empty(world * b, dtype=torch.long, device=x_0.device)
        start = time.perf_counter()
        if rank == 0:
            _, j = self._local.plan_indices(all_x0, all_x1)
            j = j.to(x_0.device)
        dist.broadcast(j, src=0, group=self.group)
        self.last_solve_seconds = time.perf_counter() - start
        return _rank_part(j, rank, b, x_0.to(device), all_x1.to(device), None if all_y is None else all_y.to(device))

    def split(
        self, x_0: list[Tensor], x_1: list[Tensor], y: list[Tensor] | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """Every rank's pairs without a process group, from the batches x_0[r], x_1[r] [b, ...] (and y[r] [b]) of
        each rank r: one exact plan over the joined batch, then rank r's x_0 rows with their matched x_1 partners.
        The same as `__call__` gives rank r in a group (a CPU worker pairs a whole step this way)."""
        b, all_x0, all_x1 = x_0[0].shape[0], torch.cat(x_0), torch.cat(x_1)
        all_y = None if y is None else torch.cat(y)
        start = time.perf_counter()
        _, j = self._local.plan_indices(all_x0, all_x1)
        self.last_solve_seconds = time.perf_counter() - start
        return [_rank_part(j, r, b, x_0[r], all_x1, all_y) for r in range(len(x_0))]


def _rank_part(
    j: Tensor, rank: int, b: int, x_0: Tensor, all_x1: Tensor, all_y: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rank `rank`'s x_0 [b, ...] and the partners the global plan j [W * b] gives its rows."""
    mine = j[rank * b : (rank + 1) * b].to(all_x1.device)
    return x_0, all_x1[mine], None if all_y is None else all_y[mine]


def _all_gather(x: Tensor, world: int, group=None) -> Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


@dataclass(frozen=True)
class CouplingSpec:
    """A registered coupling: its class, its label in tables and docs, and how a method's parameters
    (`fm.methods.MethodParams`) give its constructor arguments."""

    cls: type[Coupling]
    label: str
    args: Callable[[Any], dict] = lambda params: {}


# The one place to add a coupling: an entry here, then a method preset in fm.methods.METHODS that uses it.
COUPLINGS: dict[str, CouplingSpec] = {
    "independent": CouplingSpec(IndependentCoupling, "independent"),
    "exact_ot": CouplingSpec(ExactOTCoupling, "exact OT"),
    "entropic_ot": CouplingSpec(EntropicOTCoupling, "entropic OT", lambda p: {"reg": 2 * p.sigma**2}),
    "global_ot": CouplingSpec(GlobalOTCoupling, "exact OT (global batch)"),
    "given": CouplingSpec(GivenCoupling, "given pairs"),
}


def make_coupling(name: str, **kwargs) -> Coupling:
    """Build a coupling by name ("independent", "exact_ot", "entropic_ot", "global_ot", "given")."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; allowed: {', '.join(COUPLINGS)}")
    return COUPLINGS[name].cls(**kwargs)
