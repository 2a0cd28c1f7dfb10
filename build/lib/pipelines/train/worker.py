"""Distributed CFM training, the workers' side: Ray Train TorchTrainer workers (DDP), each fed paired steps by its own
Ray Data stream over the parquet shards (`pipelines.train.stream`: the coupling is solved in Ray Data tasks on CPU
workers, ahead of the step). The driver that starts them is `pipelines.train.driver`.

Workers: rebuild model and method from `fm`, resume from `ray.train.get_checkpoint()`, start the stream at the
step they resume from, train, report every `checkpoint_every` steps (every rank calls report), rank 0 logs to MLflow.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from fm.data import to_uint8
from fm.ema import EMA, PowerEMA
from fm.methods import METHODS, FlowMethod, make_method
from fm.models import build_model
from fm.seeding import derive_seed, generator, seed_default_generator
from fm.training import Pairs, StepResult, lr_at, read_ahead, train_step
from pipelines.core import storage
from pipelines.core.checkpoint import checkpoint_meta, load_meta, load_state, save_checkpoint
from pipelines.core.figures import save_grid
from pipelines.core.manifest import DataSpec
from pipelines.core.run_logger import SafeLogger, now_ms
from pipelines.core.runtime import quiet_train_worker, use_cpu_share
from pipelines.core.settings import autocast_dtype
from pipelines.core.system_metrics import system_metrics
from pipelines.train.config import Config, method_kwargs
from pipelines.train.metrics import WINDOWS, quick_http_failures
from pipelines.train.stream import DROPOUT_STREAM, StreamSpec, iter_pairs, stream_record
from pipelines.train.validation import ValidationSet, validation_loss

EMA_SNAPSHOTS = "ema_snapshots"  # the folder of a run's post-hoc EMA snapshots


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (e.g. too many non-finite losses)."""


@dataclass
class TrainJob:
    """What the driver hands every worker: the typed config and what it resolved before Ray started."""

    config: Config
    model_kwargs: dict
    data: DataSpec
    tracking_uri: str
    run_id: str
    fault_marker: str
    stream: StreamSpec
    verbose: bool = False
    validation: ValidationSet | None = None  # train.val_rows held-out rows, scored at every checkpoint
    init_weights: dict | None = None  # train.init_from's EMA weights, read by the driver: a fresh run starts from them
    run_dir: str = ""  # the run's folder (local or object store): its post-hoc EMA snapshots go to ema_snapshots/


@dataclass
class WorkerState:
    """A worker's model, method, optimizer and counters; restored from the last checkpoint on a restart
    (`_build_state`). `TrainWorker` alone changes it."""

    model: torch.nn.Module
    ddp_model: torch.nn.Module
    method: FlowMethod
    optimizer: torch.optim.Optimizer
    ema: EMA
    device: torch.device
    rank: int
    world: int
    step: int = 0
    nonfinite_run: int = 0
    nonfinite_total: int = 0
    last_metrics: dict = field(default_factory=dict)
    autocast_dtype: torch.dtype | None = None  # train.precision on this worker's device
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    # rank 0: logging windows (step, metrics) not yet covered by a checkpoint; they go to MLflow once one is, so
    # that a restart from that checkpoint never leaves a second value for a step in the run's history
    pending: list = field(default_factory=list)
    power_ema: PowerEMA | None = None  # post-hoc EMA profiles (train.ema_snapshot_every > 0)

    def count_nonfinite(self, res: StepResult, limit: int) -> None:
        """Count a step's finiteness: a finite step ends a run of non-finite ones; `limit` non-finite steps in a row
        raise TrainingError. Every rank sees the same all-reduced gradients, so all agree on skipping a non-finite
        step (a rank whose own loss alone is non-finite poisons the shared gradients, so the step is skipped
        everywhere)."""
        if res.finite:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        if self.nonfinite_run >= limit:
            raise TrainingError(
                f"{self.nonfinite_run} non-finite losses in a row at step {self.step + 1} "
                f"(train.max_nonfinite={limit}); lower optim.lr or check data"
            )


class MetricWindow:
    """Sums over one logging window: losses, gradient norms, data wait, step time and OT solve time."""

    def __init__(self):
        self.losses, self.grad_norms, self.wait, self.total, self.ot, self.n = [], [], 0.0, 0.0, 0.0, 0

    def add(self, res: StepResult, wait: float, total: float, ot: float) -> None:
        self.losses.append(res.loss)
        self.grad_norms.append(res.grad_norm)
        self.wait, self.total, self.ot, self.n = self.wait + wait, self.total + total, self.ot + ot, self.n + 1

    def metrics(self, images_per_step: int, lr: float, nonfinite_total: int) -> dict:
        finite = [v for v in self.losses if np.isfinite(v)]
        return {
            "loss": float(np.mean(finite)) if finite else float("nan"),
            "grad_norm": float(np.nanmean(self.grad_norms)) if finite else float("nan"),
            "lr": lr,
            "images_per_s": self.n * images_per_step / max(self.total, 1e-9),
            "data_wait_fraction": self.wait / max(self.total, 1e-9),
            "ot_solve_s": self.ot / max(self.n, 1),
            "nonfinite_total": nonfinite_total,
        }


@dataclass
class StepTimers:
    """The worker's clocks, in one place: this attempt's start, the stream's start-up (the first step's wait) and
    the waits and step times of every later step (a running stream, epoch boundaries included)."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    startup: float = 0.0
    wait_total: float = 0.0
    time_total: float = 0.0

    def add(self, step: int, wait: float, total: float) -> None:
        """Step `step` (1-based, as counted after it) waited `wait` s for its pairs and took `total` s in all."""
        if step == self.start_step + 1:
            self.startup = wait
        else:
            self.wait_total, self.time_total = self.wait_total + wait, self.time_total + total

    def run_metrics(self) -> dict[str, float]:
        return {"data_wait_fraction_run": self.wait_total / max(self.time_total, 1e-9), "data_startup_s": self.startup}

    def seconds_per_step(self, step: int) -> float:
        return (time.perf_counter() - self.started) / (step - self.start_step)


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker (`TrainWorker`); the first worker of each node logs the node's system metrics to the run
    meanwhile."""
    import ray.train

    job: TrainJob = loop_config["job"]
    if not job.verbose:
        quiet_train_worker()
    quick_http_failures()  # before any MLflow client of this process: a tracking outage fails fast here
    ctx = ray.train.get_context()
    one_node = ctx.get_local_world_size() == ctx.get_world_size()
    with system_metrics(
        job.tracking_uri,
        job.run_id,
        job.config.mlflow.system_metrics and ctx.get_local_rank() == 0,
        None if one_node else f"node{ctx.get_node_rank()}",
    ):
        use_cpu_share(job.config.ray.cpus_per_worker)
        TrainWorker(job).run()


class TrainWorker:
    """One Ray Train worker's training, as one object with named phases: restore (`__init__`: model, method,
    optimizer and EMA from the last checkpoint), then per step read -> fault hook -> step -> averages -> snapshot ->
    log window -> grid -> checkpoint, and at the end the last grid. Rank 0 logs to MLflow; every rank reports."""

    def __init__(self, job: TrainJob):
        self.job, self.cfg = job, job.config
        self.state = _build_state(job)
        self.logger = self._rank0_logger()
        self.timers = StepTimers(self.state.step)
        self.window = MetricWindow()

    def run(self) -> None:
        t, state = self.cfg.train, self.state
        batches = self._steps()
        while state.step < t.steps:
            # Read the step's pairs (paired ahead by the stream)
            t_start = time.perf_counter()
            step, pairs = next(batches)
            t_data = time.perf_counter() - t_start
            if step != state.step:  # the reader numbers batches from the step the worker started at
                raise RuntimeError(f"internal: the batch of step {step} arrived at step {state.step}")
            self._maybe_inject_fault()
            # Take the step
            res = self.step(pairs)
            # Update the EMAs (a finite step), or count a non-finite one, which the optimizer skipped
            state.count_nonfinite(res, t.max_nonfinite)
            if res.finite:
                self.update_averages()
            state.step += 1
            # Save the post-hoc EMA snapshot
            if (
                state.power_ema is not None
                and t.ema_snapshot_every
                and state.step % t.ema_snapshot_every == 0
                and state.rank == 0
            ):
                self.save_ema_snapshot(state.power_ema)
            # Time the step
            t_total = time.perf_counter() - t_start
            self.window.add(res, t_data, t_total, pairs.solve_seconds)
            self.timers.add(state.step, t_data, t_total)
            # Close the logging window
            if state.step % t.log_every == 0 or state.step == t.steps:
                self.close_window()
            # Sample a grid
            if self.logger and t.sample_every and state.step % t.sample_every == 0:
                self.log_grid(self.logger)
            # Checkpoint and report
            if state.step % t.checkpoint_every == 0 or state.step == t.steps:
                self.report()
        if self.logger:
            if t.sample_every == 0 or t.steps % t.sample_every:
                self.log_grid(self.logger)
            self.logger.close(self.cfg.mlflow.flush_timeout_s)

    def step(self, pairs: Pairs) -> StepResult:
        """One optimizer step on the step's pairs: its learning rate, its dropout seed, forward, backward, update."""
        cfg, state = self.cfg, self.state
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(
                state.step,
                cfg.optim.lr,
                cfg.optim.warmup_steps,
                cfg.optim.schedule,
                cfg.optim.decay_steps or cfg.train.steps,
                cfg.optim.min_lr,
                cfg.optim.power,
            )
        # dropout (the only draw of the global generator) from this rank and step alone: masks differ across ranks
        # and a restarted run draws the masks the uninterrupted one did
        seed_default_generator(derive_seed(cfg.train.seed, state.rank, state.step, DROPOUT_STREAM))
        if cfg.train.channels_last:
            pairs = _channels_last(pairs)
        return train_step(
            state.ddp_model,
            state.method,
            state.optimizer,
            pairs.x_1,
            grad_clip=cfg.optim.grad_clip,
            autocast_dtype=state.autocast_dtype,
            pairs=pairs,
            scaler=state.scaler,
        )

    def update_averages(self) -> None:
        """The EMA of the weights, and the post-hoc EMA profiles where this rank keeps them."""
        self.state.ema.update(self.state.model)
        if self.state.power_ema is not None:
            self.state.power_ema.update(self.state.model)

    def close_window(self) -> None:
        """The window's metrics become the last metrics (every rank); rank 0 prints a progress line and queues them
        for the next checkpoint's report (`report`), which sends them to MLflow."""
        t, state = self.cfg.train, self.state
        state.last_metrics = self.window.metrics(
            t.batch_size * state.world, state.optimizer.param_groups[0]["lr"], state.nonfinite_total
        )
        state.last_metrics.update(self.timers.run_metrics())  # over every step of this attempt after the first
        self.window = MetricWindow()
        if self.logger is None:
            return
        m = state.last_metrics
        state.pending.append((state.step, dict(m), now_ms()))
        eta = self.timers.seconds_per_step(state.step) * (t.steps - state.step)
        print(
            f"step {state.step}/{t.steps}  loss {m['loss']:.4f}  {m['images_per_s']:.0f} images/s  data wait "
            f"{100 * m['data_wait_fraction']:.1f}%  ETA {_duration(eta)}",
            flush=True,
        )

    def report(self) -> None:
        """Every rank reports the same number of times; rank 0 attaches the checkpoint and the logging windows it
        covers, which the controller sends to MLflow once it registers the checkpoint (`CheckpointedMetrics`)."""
        import ray.train

        job, state = self.job, self.state
        metrics = dict(state.last_metrics, step=state.step, nonfinite_total=state.nonfinite_total)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if state.rank == 0:
                if job.validation is not None:  # in the report (a sweep's scheduler reads it) and in MLflow here
                    metrics["val_loss"] = validation_loss(state.method, state.ema.module, job.validation, state.device)
                    state.pending.append((state.step, {"val_loss": metrics["val_loss"]}, now_ms()))
                self.save(tmp)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                metrics[WINDOWS] = state.pending
            ray.train.report(metrics, checkpoint=ckpt)
        state.pending = []

    def save(self, directory: str) -> None:
        """The checkpoint folder: weights, EMA, optimizer (and scaler, profiles), meta.json."""
        job, state = self.job, self.state
        save_checkpoint(
            directory,
            step=state.step,
            model=state.model,
            ema_state=state.ema.state_dict(),
            optimizer=state.optimizer,
            scaler=state.scaler,
            model_name=job.config.model.name,
            model_kwargs=job.model_kwargs,
            method_kwargs=method_kwargs(job.config, job.data),
            config=job.config.to_dict(),
            mlflow_run_id=job.run_id,
            manifest=job.data.to_dict(),
            nonfinite_total=state.nonfinite_total,
            stream=stream_record(job.stream, state.step),
        )
        if state.power_ema is not None:
            torch.save(state.power_ema.state_dict(), Path(directory) / "power_ema.pt")

    def save_ema_snapshot(self, p: PowerEMA) -> None:
        """Rank 0: the post-hoc EMA profiles at this step, with what rebuilds the model, as one object
        `ema_snapshots/step_XXXXXXXX.pt` in the run's folder (`flowray ema` reads them). A restart from an earlier
        checkpoint writes the same bytes again: the profiles are restored with the weights."""
        import io
        import json

        job, state = self.job, self.state
        meta = checkpoint_meta(
            state.step,
            job.config.model.name,
            job.model_kwargs,
            method_kwargs(job.config, job.data),
            job.config.to_dict(),
            mlflow_run_id=job.run_id,
            manifest=job.data.to_dict(),
            nonfinite_total=state.nonfinite_total,
        )
        buf = io.BytesIO()
        torch.save(
            {
                "step": state.step,
                "sigma_rels": list(p.sigma_rels),
                "gammas": list(p.gammas),
                "modules": [m.state_dict() for m in p.modules],
                "meta": json.dumps(meta.to_dict()),
            },
            buf,
        )
        storage.write_bytes(
            storage.join(job.run_dir, EMA_SNAPSHOTS, f"step_{state.step:08d}.pt"), buf.getvalue(), "train.storage_path"
        )

    def log_grid(self, logger: SafeLogger) -> None:
        """Sample a grid with the EMA model (Euler, or jumps for MeanFlow; fixed noise) and log it as
        samples/step_XXXXXX.png."""
        job, state = self.job, self.state
        if not job.data.is_image:
            return
        t = job.config.train
        h, w, c = job.data.shape
        x_0 = torch.randn(t.grid_size, c, h, w, generator=generator(1234)).to(state.device)
        num_classes = job.model_kwargs.get("num_classes")
        y = torch.arange(t.grid_size, device=state.device) % num_classes if num_classes else None
        with torch.no_grad():
            x = state.method.sample(state.method.velocity(state.ema.module, y), x_0, *_grid_solver(job)).x_1
        with tempfile.TemporaryDirectory() as tmp:
            logger.artifact(save_grid(to_uint8(x), Path(tmp) / f"step_{state.step:06d}.png"), "samples")

    def _rank0_logger(self) -> SafeLogger | None:
        """Rank 0 logs params (once, at the first start of the run) and sample grids to MLflow; the other ranks do
        not. Metrics go through the checkpoint reports (`report`)."""
        if self.state.rank != 0:
            return None
        logger = SafeLogger(self.job.tracking_uri, self.job.run_id)
        if self.state.step == 0:
            logger.params(self.cfg.flat())
        return logger

    def _steps(self):
        """Endless (step, pairs) from this worker's stream (`pipelines.train.stream`), from the step it starts at.

        The stream pairs every step on CPU workers (Ray Data tasks); a reader thread (`fm.training.read_ahead`)
        keeps up to `data.buffer_batches` of them on the worker's device, so a hiccup of the stream is absorbed by
        the buffer."""
        return read_ahead(
            iter_pairs(self.job.stream, self.state.rank, self.state.step, self.state.device),
            lambda item: item,
            self.cfg.data.buffer_batches,
        )

    def _maybe_inject_fault(self) -> None:
        """Test hook: one worker raises once at train.fail_at_step (a marker file makes it once per run)."""
        t, state = self.cfg.train, self.state
        if t.fail_at_step != state.step + 1 or state.rank != t.fail_rank:
            return
        if not storage.exists(self.job.fault_marker):
            storage.write_text(
                self.job.fault_marker, f"injected failure at step {state.step + 1} on rank {state.rank}\n"
            )
            raise RuntimeError(f"injected failure (train.fail_at_step={state.step + 1}) on rank {state.rank}")


def _build_state(job: TrainJob) -> WorkerState:
    """Model, method, optimizer and EMA, restored from `ray.train.get_checkpoint()` when the run resumes."""
    import ray.train
    import ray.train.torch

    cfg = job.config
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(cfg.model.name, **job.model_kwargs)
    if job.init_weights is not None:
        model.load_state_dict(job.init_weights)  # replaced below by the run's own checkpoint when it resumes
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    ema = EMA(model, cfg.optim.ema_decay)
    # rank 0 alone keeps the post-hoc EMA profiles: it alone saves checkpoints and snapshots
    keep_profiles = cfg.train.ema_snapshot_every and ctx.get_world_rank() == 0
    power_ema = PowerEMA(model, cfg.optim.ema_sigma_rels) if keep_profiles else None
    step, nonfinite_total = 0, 0
    dtype = autocast_dtype(cfg.train.precision, device.type)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_state(d, "model"))
            ema.load_state_dict(load_state(d, "ema"))
            if power_ema is not None:  # the resume check made sure the run kept these profiles from its start
                power_ema.load_state_dict(load_state(d, "power_ema"))
            optimizer.load_state_dict(load_state(d, "optimizer"))
            if scaler is not None and Path(d, "scaler.pt").exists():
                scaler.load_state_dict(load_state(d, "scaler"))
            meta = load_meta(d)
            step, nonfinite_total = meta.step, meta.nonfinite_total
    method = make_method(**method_kwargs(cfg, job.data))
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (not in torch's stubs)
    ddp_model = ray.train.torch.prepare_model(model)
    if cfg.train.compile:
        ddp_model = cast(nn.Module, torch.compile(ddp_model))  # after DDP, as torch's DDP + compile guide does
    return WorkerState(
        model,
        ddp_model,
        method,
        optimizer,
        ema,
        device,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        step,
        nonfinite_total=nonfinite_total,
        last_metrics={"step": step},
        autocast_dtype=dtype,
        scaler=scaler,
        power_ema=power_ema,
    )


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def _channels_last(pairs):
    """The step's image batches in NHWC memory order (the values and shapes are unchanged)."""
    return dataclasses.replace(
        pairs,
        x_0=pairs.x_0.contiguous(memory_format=torch.channels_last),
        x_1=pairs.x_1.contiguous(memory_format=torch.channels_last),
    )


def _grid_solver(job: TrainJob) -> tuple[str, int]:
    """The sample grid's solver and steps: `train.grid_steps` of Euler for a velocity field, or of jumps for
    MeanFlow's average velocity; one jump for a one-step map."""
    preset, steps = METHODS[job.config.method.name], job.config.train.grid_steps
    if preset.velocity_field:
        return "euler", steps
    return preset.fixed_step_solvers[0], 1 if preset.one_step else steps
