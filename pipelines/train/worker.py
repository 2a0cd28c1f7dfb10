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
from fm.training import StepResult, lr_at, read_ahead, train_step
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
    """A worker's model, method, optimizer and counters; restored from the last checkpoint on a restart."""

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
        return {"loss": float(np.mean(finite)) if finite else float("nan"),
                "grad_norm": float(np.nanmean(self.grad_norms)) if finite else float("nan"), "lr": lr,
                "images_per_s": self.n * images_per_step / max(self.total, 1e-9),
                "data_wait_fraction": self.wait / max(self.total, 1e-9), "ot_solve_s": self.ot / max(self.n, 1),
                "nonfinite_total": nonfinite_total}


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: restore, then batch -> fault hook -> labels -> lr -> step -> bookkeeping -> log; the
    first worker of each node logs the node's system metrics to the run meanwhile."""
    import ray.train

    job: TrainJob = loop_config["job"]
    if not job.verbose:
        quiet_train_worker()
    quick_http_failures()  # before any MLflow client of this process: a tracking outage fails fast here
    ctx = ray.train.get_context()
    one_node = ctx.get_local_world_size() == ctx.get_world_size()
    with system_metrics(job.tracking_uri, job.run_id, job.config.mlflow.system_metrics and ctx.get_local_rank() == 0,
                        None if one_node else f"node{ctx.get_node_rank()}"):
        _train(job)


def _train(job: TrainJob) -> None:
    cfg = job.config
    use_cpu_share(cfg.ray.cpus_per_worker)
    t = cfg.train
    state = _build_state(job)
    logger = _rank0_logger(job, state)
    batches = _steps(job, state)
    window, started, start_step = MetricWindow(), time.perf_counter(), state.step
    wait_total = time_total = startup = 0.0
    while state.step < t.steps:
        t_start = time.perf_counter()
        step, pairs = next(batches)
        t_data = time.perf_counter() - t_start
        if step != state.step:  # the reader numbers batches from the step the worker started at
            raise RuntimeError(f"internal: the batch of step {step} arrived at step {state.step}")
        _maybe_inject_fault(job, state)
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(state.step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule,
                                cfg.optim.decay_steps or t.steps, cfg.optim.min_lr, cfg.optim.power)
        # dropout (the only draw of the global generator) from this rank and step alone: masks differ across ranks
        # and a restarted run draws the masks the uninterrupted one did
        seed_default_generator(derive_seed(t.seed, state.rank, state.step, DROPOUT_STREAM))
        if cfg.train.channels_last:
            pairs = _channels_last(pairs)
        res = train_step(state.ddp_model, state.method, state.optimizer, pairs.x_1, grad_clip=cfg.optim.grad_clip,
                         autocast_dtype=state.autocast_dtype, pairs=pairs, scaler=state.scaler)
        _count_nonfinite(state, res, t.max_nonfinite)
        state.step += 1
        if state.power_ema is not None and t.ema_snapshot_every and state.step % t.ema_snapshot_every == 0 \
                and state.rank == 0:
            _save_ema_snapshot(job, state, state.power_ema)
        t_total = time.perf_counter() - t_start
        window.add(res, t_data, t_total, pairs.solve_seconds)
        if state.step == start_step + 1:  # the stream's start-up, apart from the waits of a running stream
            startup = t_data
        else:
            wait_total, time_total = wait_total + t_data, time_total + t_total
        if state.step % t.log_every == 0 or state.step == t.steps:
            state.last_metrics = window.metrics(t.batch_size * state.world, state.optimizer.param_groups[0]["lr"],
                                                state.nonfinite_total)
            # over every step of this attempt after the first, epoch boundaries included
            state.last_metrics.update(data_wait_fraction_run=wait_total / max(time_total, 1e-9),
                                      data_startup_s=startup)
            _log_window(logger, state, t.steps, (time.perf_counter() - started) / (state.step - start_step))
            window = MetricWindow()
        if logger and t.sample_every and state.step % t.sample_every == 0:
            _log_grid(logger, job, state)
        if state.step % t.checkpoint_every == 0 or state.step == t.steps:
            _report(job, state)
    if logger:
        if t.sample_every == 0 or t.steps % t.sample_every:
            _log_grid(logger, job, state)
        logger.close(cfg.mlflow.flush_timeout_s)


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
    return WorkerState(model, ddp_model, method, optimizer, ema, device, ctx.get_world_rank(), ctx.get_world_size(),
                       step, nonfinite_total=nonfinite_total, last_metrics={"step": step}, autocast_dtype=dtype,
                       scaler=scaler, power_ema=power_ema)


def _rank0_logger(job: TrainJob, state: WorkerState) -> SafeLogger | None:
    """Rank 0 logs params (once, at the first start of the run) and sample grids to MLflow; the other ranks do
    not. Metrics go through the checkpoint reports (`_report`)."""
    if state.rank != 0:
        return None
    logger = SafeLogger(job.tracking_uri, job.run_id)
    if state.step == 0:
        logger.params(job.config.flat())
    return logger


def _steps(job: TrainJob, state: WorkerState):
    """Endless (step, pairs) from this worker's stream (`pipelines.train.stream`), from the step the worker starts at.

    The stream pairs every step on CPU workers (Ray Data tasks); a reader thread (`fm.training.read_ahead`) keeps up to
    `data.buffer_batches` of them on the worker's device, so a hiccup of the stream is absorbed by the buffer.
    """
    return read_ahead(iter_pairs(job.stream, state.rank, state.step, state.device), lambda item: item,
                      job.config.data.buffer_batches)


def _maybe_inject_fault(job: TrainJob, state: WorkerState) -> None:
    """Test hook: one worker raises once at train.fail_at_step (a marker file makes it once per run)."""
    t = job.config.train
    if t.fail_at_step != state.step + 1 or state.rank != t.fail_rank:
        return

    if not storage.exists(job.fault_marker):
        storage.write_text(job.fault_marker, f"injected failure at step {state.step + 1} on rank {state.rank}\n")
        raise RuntimeError(f"injected failure (train.fail_at_step={state.step + 1}) on rank {state.rank}")


def _count_nonfinite(state: WorkerState, res: StepResult, limit: int) -> None:
    """Every rank sees the same all-reduced gradients, so all agree on skipping a non-finite step (a rank whose
    own loss alone is non-finite poisons the shared gradients, so the step is skipped everywhere)."""
    if res.finite:
        state.nonfinite_run = 0
        state.ema.update(state.model)
        if state.power_ema is not None:
            state.power_ema.update(state.model)
        return
    state.nonfinite_run += 1
    state.nonfinite_total += 1
    if state.nonfinite_run >= limit:
        raise TrainingError(f"{state.nonfinite_run} non-finite losses in a row at step {state.step + 1} "
                            f"(train.max_nonfinite={limit}); lower optim.lr or check data")


def _log_window(logger: SafeLogger | None, state: WorkerState, steps: int, seconds_per_step: float) -> None:
    """Rank 0: one progress line to the console; the window's metrics wait for the next checkpoint (`_report`)."""
    if logger is None:
        return
    m = state.last_metrics
    state.pending.append((state.step, dict(m), now_ms()))
    eta = seconds_per_step * (steps - state.step)
    print(f"step {state.step}/{steps}  loss {m['loss']:.4f}  {m['images_per_s']:.0f} images/s  data wait "
          f"{100 * m['data_wait_fraction']:.1f}%  ETA {_duration(eta)}", flush=True)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def _report(job: TrainJob, state: WorkerState) -> None:
    """Every rank reports the same number of times; rank 0 attaches the checkpoint and the logging windows it
    covers, which the controller sends to MLflow once it registers the checkpoint (`CheckpointedMetrics`)."""
    import ray.train

    metrics = dict(state.last_metrics, step=state.step, nonfinite_total=state.nonfinite_total)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if state.rank == 0:
            if job.validation is not None:  # in the report (a sweep's scheduler reads it) and in MLflow at this step
                metrics["val_loss"] = validation_loss(state.method, state.ema.module, job.validation, state.device)
                state.pending.append((state.step, {"val_loss": metrics["val_loss"]}, now_ms()))
            _save(job, state, tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            metrics[WINDOWS] = state.pending
        ray.train.report(metrics, checkpoint=ckpt)
    state.pending = []


def _channels_last(pairs):
    """The step's image batches in NHWC memory order (the values and shapes are unchanged)."""
    return dataclasses.replace(pairs, x_0=pairs.x_0.contiguous(memory_format=torch.channels_last),
                               x_1=pairs.x_1.contiguous(memory_format=torch.channels_last))


def _save(job: TrainJob, state: WorkerState, directory: str) -> None:
    save_checkpoint(directory, step=state.step, model=state.model, ema_state=state.ema.state_dict(),
                    optimizer=state.optimizer, scaler=state.scaler, model_name=job.config.model.name,
                    model_kwargs=job.model_kwargs,
                    method_kwargs=method_kwargs(job.config, job.data), config=job.config.to_dict(),
                    mlflow_run_id=job.run_id, manifest=job.data.to_dict(), nonfinite_total=state.nonfinite_total,
                    stream=stream_record(job.stream, state.step))
    if state.power_ema is not None:
        torch.save(state.power_ema.state_dict(), Path(directory) / "power_ema.pt")


def _save_ema_snapshot(job: TrainJob, state: WorkerState, p: PowerEMA) -> None:
    """Rank 0: the post-hoc EMA profiles at this step, with what rebuilds the model, as one object
    `ema_snapshots/step_XXXXXXXX.pt` in the run's folder (`flowray ema` reads them). A restart from an earlier
    checkpoint writes the same bytes again: the profiles are restored with the weights."""
    import io
    import json

    meta = checkpoint_meta(state.step, job.config.model.name, job.model_kwargs, method_kwargs(job.config, job.data),
                           job.config.to_dict(), mlflow_run_id=job.run_id, manifest=job.data.to_dict(),
                           nonfinite_total=state.nonfinite_total)
    buf = io.BytesIO()
    torch.save({"step": state.step, "sigma_rels": list(p.sigma_rels), "gammas": list(p.gammas),
                "modules": [m.state_dict() for m in p.modules], "meta": json.dumps(meta.to_dict())}, buf)
    storage.write_bytes(storage.join(job.run_dir, EMA_SNAPSHOTS, f"step_{state.step:08d}.pt"), buf.getvalue(),
                        "train.storage_path")


def _grid_solver(job: TrainJob) -> str:
    """The sample grid's solver: Euler for a velocity field, jumps for MeanFlow's average velocity."""
    preset = METHODS[job.config.method.name]
    return "euler" if preset.velocity_field else preset.fixed_step_solvers[0]


def _log_grid(logger: SafeLogger, job: TrainJob, state: WorkerState) -> None:
    """Sample a grid with the EMA model (Euler, fixed noise) and log it as samples/step_XXXXXX.png."""
    if not job.data.is_image:
        return
    t = job.config.train
    h, w, c = job.data.shape
    x_0 = torch.randn(t.grid_size, c, h, w, generator=generator(1234)).to(state.device)
    num_classes = job.model_kwargs.get("num_classes")
    y = torch.arange(t.grid_size, device=state.device) % num_classes if num_classes else None
    with torch.no_grad():
        x = state.method.sample(state.method.velocity(state.ema.module, y), x_0, _grid_solver(job),
                                t.grid_steps).x_1
    with tempfile.TemporaryDirectory() as tmp:
        logger.artifact(save_grid(to_uint8(x), Path(tmp) / f"step_{state.step:06d}.png"), "samples")
