"""One optimisation step, shared by in-process training and the Ray Train workers, and a toy 2-D fit."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from fm.couplings import GlobalOTCoupling
from fm.data import sample_toy
from fm.ema import EMA
from fm.methods import FlowMethod, Method

__all__ = [
    "StepResult",
    "Pairs",
    "pair_step",
    "given_pair_step",
    "pair_global_step",
    "read_ahead",
    "train_step",
    "SCHEDULES",
    "lr_at",
    "fit",
    "fit_toy",
]

T = TypeVar("T")
U = TypeVar("U")

SCHEDULES = ("constant", "cosine", "polynomial")


@dataclass
class StepResult:
    """loss: batch mean; grad_norm: before clipping; finite: False when the step was skipped."""

    loss: float
    grad_norm: float
    finite: bool


def lr_at(
    step: int,
    base_lr: float,
    warmup_steps: int = 0,
    schedule: str = "constant",
    total_steps: int | None = None,
    min_lr: float = 0.0,
    power: float = 1.0,
) -> float:
    """The learning rate of 0-based step `step`: linear warm-up to base_lr over warmup_steps, then constant,
    cosine or polynomial decay to min_lr at total_steps (Lipman et al. Table 3: polynomial after 45k warm-up).

    polynomial: min_lr + (base_lr - min_lr) (1 - p)^power, cosine: min_lr + (base_lr - min_lr) (1 + cos(pi p)) / 2,
    with p the fraction of the decay phase done.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps is None or total_steps <= warmup_steps:
        return base_lr
    p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    return min_lr + (base_lr - min_lr) * (1.0 - p) ** power


@dataclass
class Pairs:
    """A step's batch paired ahead of the step (`pair_step`): x_0, x_1 [B, ...], labels y [B] or None, the step's
    generator after the pairing's draws, and the coupling's solve time in seconds."""

    x_0: Tensor
    x_1: Tensor
    y: Tensor | None
    generator: torch.Generator
    solve_seconds: float


def pair_step(method: FlowMethod, x_1: Tensor, y: Tensor | None, generator: torch.Generator) -> Pairs:
    """Draw a step's noise and solve its coupling, as `method.loss` would at the start of the step."""
    x_0, x_1, y = method.pair(x_1, y, generator)
    return Pairs(x_0, x_1, y, generator, method.coupling.last_solve_seconds)


def given_pair_step(
    method: FlowMethod, x_0: Tensor, x_1: Tensor, y: Tensor | None, generator: torch.Generator
) -> Pairs:
    """A step of pairs that come with the data (reflow: x_0 [B, ...] regenerated from each row's seed, x_1 [B, ...]
    its sample), kept as given; the loss continues from `generator` (times and path noise)."""
    if not isinstance(method, Method) or not method.pairs_given:
        raise ValueError(f"method {method.name!r} pairs its own noise; given pairs are for reflow")
    x_0, x_1, y = method.coupling(x_0, x_1, y, generator)
    return Pairs(x_0, x_1, y, generator, 0.0)


def pair_global_step(
    method: FlowMethod, x_1: list[Tensor], y: list[Tensor] | None, generators: list[torch.Generator]
) -> list[Pairs]:
    """Every rank's `pair_step` under the global-batch coupling (`fm.couplings.GlobalOTCoupling`), made in one
    process: rank r's noise from generators[r] for its batch x_1[r] [b, ...] (labels y[r] [b]), one plan over the
    step's global batch, split afterwards. The pairs each rank of a process group gets from `pair_step`."""
    if not isinstance(method, Method) or not isinstance(method.coupling, GlobalOTCoupling):
        raise ValueError(
            f"method {method.name!r} does not couple over the global batch (its coupling is "
            f"{type(method.coupling).__name__})"
        )
    x_0 = [method.noise(x, g) for x, g in zip(x_1, generators, strict=True)]
    parts = method.coupling.split(x_0, x_1, y)
    seconds = method.coupling.last_solve_seconds
    return [Pairs(a, b, c, g, seconds) for (a, b, c), g in zip(parts, generators, strict=True)]


def read_ahead(items: Iterator[T], fn: Callable[[T], U], buffer: int) -> Iterator[U]:
    """fn over items in a thread of its own, up to `buffer` results ahead of the consumer; in order.

    What the consumer does meanwhile (a training step, mostly outside the GIL) and what the thread does (reading the
    next batches, solving the next couplings: POT's solver and torch both release the GIL) overlap. An error in
    the thread is raised to the consumer. buffer <= 0 calls fn in the consumer's thread.
    """
    if buffer <= 0:
        yield from (fn(item) for item in items)
        return
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=buffer)
    done = object()

    def work() -> None:
        try:
            for item in items:
                ready.put(fn(item))
            ready.put(done)
        except BaseException as err:  # handed to the consumer, which raises it
            ready.put(err)

    threading.Thread(target=work, name="flowray-read-ahead", daemon=True).start()
    while (out := ready.get()) is not done:
        if isinstance(out, BaseException):
            raise out
        yield out


def train_step(
    model: nn.Module,
    method: FlowMethod,
    optimizer: torch.optim.Optimizer,
    x_1: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    grad_clip: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    pairs: Pairs | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """Compute the method's loss on x_1 [B, ...], backpropagate, clip and step.

    With `pairs` (made by `pair_step` ahead of the step, from this step's generator) x_1, y and generator are
    taken from it, and the loss continues where the pairing stopped: the same result as pairing in the step.
    `autocast_dtype` runs the forward pass under autocast (bf16 or fp16; the weights and the optimizer stay fp32);
    fp16 needs a `scaler` (`torch.amp.GradScaler`), which scales the loss, unscales the gradients before clipping
    and skips the update of a step whose scaled gradients overflowed (lowering the scale).

    A non-finite loss or gradient skips the update (the optimizer state is untouched) and reports finite=False,
    so the caller can count skips and abort after too many in a row. Backward runs even for a non-finite loss:
    under DDP every rank must join the gradient all-reduce, and the non-finite gradients it spreads make every
    rank skip the same step. Under a scaler only a non-finite loss counts: overflowing fp16 gradients are the
    scaler's business (it skips the step and halves the scale), not a diverging model.
    """
    device = (pairs.x_1 if pairs is not None else x_1).device
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if pairs is None:
            loss = method.loss(model, x_1, y, generator).mean()
        else:
            loss = method.loss_on_pairs(model, pairs.x_0, pairs.x_1, pairs.y, pairs.generator).mean()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)  # skipped inside when the gradients overflowed
        scaler.update()
        return StepResult(loss.item(), grad_norm.item(), bool(torch.isfinite(loss)))
    if not (torch.isfinite(grad_norm) and torch.isfinite(loss)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.item(), grad_norm.item(), False)
    optimizer.step()
    return StepResult(loss.item(), grad_norm.item(), True)


def fit(
    model: nn.Module,
    method: FlowMethod,
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor | None]],
    steps: int = 2000,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    schedule: str = "constant",
    warmup_steps: int | None = None,
) -> tuple[EMA, list[float]]:
    """Train a model in process on batches drawn by `batch(generator) -> (x_1 [B, ...], y [B] or None)`; returns
    the EMA of the weights and the loss history. Warm-up defaults to min(100, steps / 10) steps."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMA(model, ema_decay)
    warmup = min(100, steps // 10) if warmup_steps is None else warmup_steps
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup, schedule, steps)
        x_1, y = batch(g)
        res = train_step(model, method, opt, x_1, y, generator=g)
        ema.update(model)
        losses.append(res.loss)
    return ema, losses


def fit_toy(
    model: nn.Module,
    method: FlowMethod,
    data: str,
    steps: int = 2000,
    batch: int = 256,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
) -> tuple[EMA, list[float]]:
    """Train a model on a toy 2-D set in process; returns the EMA of the weights and the loss history."""
    return fit(model, method, lambda g: (sample_toy(data, batch, g), None), steps, lr, ema_decay, seed)
