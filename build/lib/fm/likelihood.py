"""CNF likelihood by the instantaneous change of variables, and bits/dim of 8-bit images.

log p_1(x_1) = log p_0(x_0) - int_0^1 Tr(dv/dx)(x_t, t) dt, integrated from data (t = 1) back to noise (t = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fm.seeding import SeedStack
from fm.solvers import VelocityFn, integration_times

# A generator for the probes and dequantization noise: one torch.Generator for the batch, or a SeedStack (one
# generator per row), with which a row's draws, and so its estimate, do not depend on the other rows of its batch.
Draws = torch.Generator | SeedStack | None

__all__ = [
    "LikelihoodSettings",
    "LikelihoodResult",
    "BitsPerDimResult",
    "standard_normal_log_prob",
    "divergence_exact",
    "divergence_hutchinson",
    "make_probes",
    "log_likelihood",
    "dequantize",
    "bits_per_dim",
    "mean_and_stderr",
]


@dataclass
class LikelihoodResult:
    """log_p: log-density per sample [B] (nats); x_0: the noise end [B, ...]; nfe: batch evaluations of v."""

    log_p: Tensor
    x_0: Tensor
    nfe: int


@dataclass
class BitsPerDimResult:
    """bpd: bits/dim per image [B]; mean and stderr over the batch; nfe: mean NFE per likelihood solve;
    draws: the number K of dequantization draws used."""

    bpd: Tensor
    mean: float
    stderr: float
    nfe: float
    draws: int


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor."""
    v = values.double()
    stderr = (v.std(unbiased=True) / math.sqrt(v.numel())).item() if v.numel() > 1 else float("nan")
    return v.mean().item(), stderr


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) summed over all but the batch dim, [B]."""
    d = x[0].numel()
    return -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)


def divergence_exact(fn: VelocityFn, x: Tensor, t: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """v(x, t) and its exact divergence Tr(dv/dx) for any shape [B, ...], by D vector-Jacobian products.

    The products are batched `chunk` basis vectors at a time (vmap through `is_grads_batched`).
    Samples must not interact inside fn (no batch statistics), which holds for models in eval mode.
    Returns (v [B, ...], div [B]).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = fn(x, t)
        flat_v = v.flatten(1)
        b, d = flat_v.shape
        div = torch.zeros(b, dtype=v.dtype, device=v.device)
        eye = torch.eye(d, dtype=v.dtype, device=v.device)
        for start in range(0, d, chunk):
            basis = eye[start : start + chunk]  # [c, D]
            cot = basis[:, None, :].expand(-1, b, -1)  # e_k for every sample, [c, B, D]
            (jac_rows,) = torch.autograd.grad(flat_v, x, cot, retain_graph=True, is_grads_batched=True)
            # row k of the Jacobian dotted with e_k gives the diagonal entry dv_k/dx_k
            div += (jac_rows.reshape(basis.shape[0], b, d) * basis[:, None, :]).sum((0, 2))
    return v.detach(), div.detach()


def make_probes(x: Tensor, num_probes: int, kind: str = "rademacher", generator: Draws = None) -> Tensor:
    """Hutchinson probes of shape [K, B, ...], Rademacher (+-1) or Gaussian, held fixed along a trajectory; with a
    `SeedStack`, row b's K probes come from its own generator."""
    if num_probes < 1:
        raise ValueError(f"number of Hutchinson probes K must be >= 1; got {num_probes}")
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"unknown probe kind {kind!r}; allowed: rademacher, gaussian")
    if isinstance(generator, SeedStack):
        per_row = (num_probes, *x.shape[1:])
        draws = generator.randint(0, 2, per_row) if kind == "rademacher" else generator.randn(per_row, x.dtype)
        draws = draws.transpose(0, 1).to(device=x.device)
    else:
        shape = (num_probes, *x.shape)
        draws = (
            torch.randint(0, 2, shape, generator=generator, device=x.device)
            if kind == "rademacher"
            else torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        )
    return draws.to(x.dtype) * 2 - 1 if kind == "rademacher" else draws.to(x.dtype)


def divergence_hutchinson(fn: VelocityFn, x: Tensor, t: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """v(x, t) and the Hutchinson estimate mean_k eps_k^T (dv/dx) eps_k, with probes [K, B, ...].

    Returns (v [B, ...], div [B]).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = fn(x, t)
        (vjp,) = torch.autograd.grad(v, x, probes, is_grads_batched=True)
    div = (vjp * probes).flatten(2).sum(2).mean(0)
    return v.detach(), div.detach()


@dataclass(frozen=True)
class LikelihoodSettings:
    """How a log-density is computed.

    divergence: "exact" (D vector-Jacobian products) or "hutchinson" (num_probes probes of probe_kind, fixed
    along the path). solver, atol, rtol, steps: the torchdiffeq solve (dopri5 at 1e-5 by default; steps for a
    fixed-step method). t_1: the data end (just below 1 for the VP path, whose field diverges at t = 1).
    chunk: basis vectors per batched product of the exact divergence.
    """

    divergence: str = "exact"
    num_probes: int = 1
    probe_kind: str = "rademacher"
    solver: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    steps: int | None = None
    t_1: float = 1.0
    chunk: int = 256


def log_likelihood(
    fn: VelocityFn,
    x_1: Tensor,
    settings: LikelihoodSettings | None = None,
    generator: Draws = None,
    log_p0: Callable[[Tensor], Tensor] = standard_normal_log_prob,
) -> LikelihoodResult:
    """log p_1(x_1) of the flow dx/dt = v(x, t), with x_0 ~ p_0 at t = 0.

    Args:
        fn: velocity function fn(x [B, ...], t [B]).
        x_1: data points [B, ...].
        settings: divergence, solver and end time (`LikelihoodSettings()`: exact divergence, dopri5 at 1e-5).
        generator: for the Hutchinson probes (a `SeedStack`: each row's from its own generator).
        log_p0: log-density of the noise, [B, ...] -> [B].
    Returns:
        `LikelihoodResult` (log-density in nats per sample, the noise end, NFE).
    """
    s = settings or LikelihoodSettings()
    if s.divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {s.divergence!r}; allowed: exact, hutchinson")
    ts = integration_times(s.solver, s.steps, s.t_1, 0.0, s.atol, s.rtol, x_1)
    probes = make_probes(x_1, s.num_probes, s.probe_kind, generator) if s.divergence == "hutchinson" else None
    t_1 = s.t_1
    nfe = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        x = state[0]
        tb = t.clamp(0.0, t_1).expand(x.shape[0])  # adaptive steps may overshoot t = 0
        if probes is None:
            v, div = divergence_exact(fn, x, tb, s.chunk)
        else:
            v, div = divergence_hutchinson(fn, x, tb, probes)
        return v, div

    from torchdiffeq import odeint  # here, not at the top: see `fm.solvers.ode_sample`

    delta_1 = torch.zeros(x_1.shape[0], device=x_1.device, dtype=x_1.dtype)
    xs, deltas = odeint(rhs, (x_1, delta_1), ts, method=s.solver, atol=s.atol, rtol=s.rtol)
    # d(delta)/dt = div v from t_1 (delta = 0) to t = 0 gives delta(0) = -int_0^t_1 div dt.
    x_0 = xs[-1]
    return LikelihoodResult(log_p0(x_0) + deltas[-1], x_0, nfe)


def dequantize(x_uint8: Tensor, u: Tensor) -> Tensor:
    """Map 8-bit values plus uniform noise u in [0, 1) to model space: (x + u) / 127.5 - 1.

    This matches training's x / 127.5 - 1; each unit cell of (x + u) has volume (1 / 127.5)^D in model space.
    """
    return (x_uint8.to(u.dtype) + u) / 127.5 - 1.0


def bits_per_dim(
    fn: VelocityFn, x_uint8: Tensor, draws: int = 1, generator: Draws = None, settings: LikelihoodSettings | None = None
) -> BitsPerDimResult:
    """Bits/dim of 8-bit images with uniform dequantization and K importance-weighted draws.

    log P(x) >= log (1/K) sum_k p(y_k) + D log(1/127.5), y_k = dequantize(x, u_k), u_k ~ U[0, 1)^D,
    the bound tightening as K grows. bpd = -log P(x) / (D ln 2). The bound holds for exact log-densities only:
    K > 1 with the Hutchinson divergence is refused (its log-mean-exp is biased low in bits/dim).

    Args:
        fn: velocity function in model space. x_uint8: images [B, ...] with values 0..255.
        draws: K. generator: for the dequantization noise (and Hutchinson probes); a `SeedStack` draws each
            image's from its own generator, so its noise does not depend on how images are batched.
        settings: of each `log_likelihood` solve (divergence, probes, solver, t_1).
    """
    if draws < 1:
        raise ValueError(f"number of dequantization draws K must be >= 1; got {draws}")
    s = settings or LikelihoodSettings()
    if draws > 1 and s.divergence == "hutchinson":
        # log-mean-exp of K unbiased but noisy log-density estimates is biased upward (Jensen), so the "bound"
        # comes out below the true one; K > 1 needs the exact divergence
        raise ValueError(
            f"K={draws} dequantization draws need the exact divergence: with Hutchinson estimates "
            "their log-mean-exp is biased (bits/dim too low); use draws=1 or divergence='exact'"
        )
    if x_uint8.dtype == torch.uint8:
        x_uint8 = x_uint8.float()
    if x_uint8.numel() and (x_uint8.min() < 0 or x_uint8.max() > 255):
        raise ValueError(f"images must hold 8-bit values in [0, 255]; got [{x_uint8.min()}, {x_uint8.max()}]")
    d = x_uint8[0].numel()
    log_ps, nfes = [], []
    for _ in range(draws):
        if isinstance(generator, SeedStack):
            u = generator.rand(x_uint8.shape[1:], x_uint8.dtype).to(x_uint8.device)
        else:
            u = torch.rand(x_uint8.shape, generator=generator, device=x_uint8.device, dtype=x_uint8.dtype)
        res = log_likelihood(fn, dequantize(x_uint8, u), settings, generator)
        log_ps.append(res.log_p)
        nfes.append(res.nfe)
    log_p = torch.logsumexp(torch.stack(log_ps), 0) - math.log(draws) - d * math.log(127.5)
    bpd = -log_p / (d * math.log(2))
    mean, stderr = mean_and_stderr(bpd)
    return BitsPerDimResult(bpd, mean, stderr, sum(nfes) / len(nfes), draws)
