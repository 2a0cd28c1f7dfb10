"""The training config: one dataclass per concern (data, model, method, optim, train, ray, mlflow), loaded from YAML,
overridden by `section.key=value`, validated in full before any Ray work starts, and checked against the data's
manifest. Errors name the key, the bad value and what is allowed (`pipelines.core.settings`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fm.ema import SIGMA_REL_MAX
from fm.losses import TIME_SAMPLINGS
from fm.methods import JUMP, METHODS, make_method
from fm.models import MODELS
from fm.solvers import ADAPTIVE_METHODS, FIXED_METHODS
from fm.training import SCHEDULES
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PRECISIONS, check, check_resource_name, json_schema, load_sections
from pipelines.core.storage import check_name

MAX_EMA_SNAPSHOTS = 1000  # per run: a snapshot holds one model per optim.ema_sigma_rels entry


@dataclass
class DataConfig:
    """The ingest output to train on and how its rows are read."""

    shards: str = "data/digits"  # an ingest output directory (holds manifest.json)
    split: str = "train"
    hflip: bool = False  # random horizontal flips in preprocessing
    buffer_batches: int = 96  # paired steps a worker's reader thread keeps ready on its device
    shuffle_window: int = 65_536  # rows shuffled together in a pass, after the row groups (pipelines.train.stream)


@dataclass
class ModelConfig:
    """The network (`fm.models`): a UNet for images, an MLP for points."""

    name: str = "unet"
    model_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [4])
    dropout: float = 0.0
    num_heads: int = 2
    class_conditional: bool = False
    label_dropout: float = 0.1  # probability of the null label in training, for classifier-free guidance
    hidden: int = 256  # mlp only
    depth: int = 3  # mlp only


@dataclass
class MethodConfig:
    """The flow-matching method (`fm.methods`): path, coupling and their parameters."""

    name: str = "fm_ot"
    sigma_min: float = 1e-4
    sigma: float | None = None  # straight-line path noise; null: the method's default (fm.methods.METHODS)
    ot_scope: str = "local"  # otcfm: "local" (per worker) or "global" (one plan over all workers' batches)
    beta_min: float = 0.1
    beta_max: float = 20.0
    time_sampling: str = "uniform"  # training t: "uniform" or "logit_normal" (fm.losses.TimeSampling)
    time_loc: float = 0.0  # logit_normal: t = sigmoid(time_loc + time_scale * n), n ~ N(0, 1)
    time_scale: float = 1.0
    # meanflow (fm.meanflow): the fraction of training intervals with r != t, and the adaptive loss weight's power p
    # (w = 1 / (||Delta||^2 + 1e-3)^p; 0: the plain squared error); the paper's defaults
    meanflow_ratio: float = 0.25
    meanflow_p: float = 1.0


@dataclass
class OptimConfig:
    """AdamW, its learning-rate schedule, gradient clipping and the EMA."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"  # after warm-up: constant, cosine or polynomial decay (fm.training.lr_at)
    decay_steps: int | None = None  # the step at which the decay reaches min_lr; null: train.steps
    min_lr: float = 0.0
    power: float = 1.0  # polynomial decay exponent
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # post-hoc EMA (EDM2): the power-function EMA profiles kept beside the EMA when train.ema_snapshot_every > 0,
    # as their relative standard deviations (fm.ema.PowerEMA); `flowray ema` rebuilds any other length from them
    ema_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])


@dataclass
class TrainConfig:
    """Steps, batch, seeds, cadences of checkpoints, logs and sample grids, precision."""

    steps: int = 500
    batch_size: int = 64  # per worker
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    sample_every: int = 250  # sample grid to MLflow every M steps (0: only at the end)
    grid_size: int = 64
    grid_steps: int = 20  # Euler steps for the sample grid
    max_nonfinite: int = 5  # abort after this many non-finite losses in a row
    fail_at_step: int | None = None  # test hook: one worker raises once at this step
    fail_rank: int = 1
    run_name: str = "digits-cpu"
    storage_path: str = "outputs/ray_results"  # a local folder, or an object-store URI (s3://, gs://)
    num_to_keep: int = 2
    # snapshots of the post-hoc EMA profiles (optim.ema_sigma_rels) every this many steps, kept in the run's folder
    # (ema_snapshots/), at most MAX_EMA_SNAPSHOTS per run; 0: no profiles, no snapshots
    ema_snapshot_every: int = 0
    # autocast of the forward pass: auto (bf16 on a GPU, fp32 on CPU) | fp32 | bf16 | fp16 (GPU only, GradScaler)
    precision: str = "auto"
    compile: bool = False  # torch.compile the training model (after the DDP wrapper; the checkpoint is unchanged)
    channels_last: bool = False  # NHWC memory format for the UNet and its batches (faster convolutions on GPUs)
    # a checkpoint (folder or object-store prefix) whose EMA weights start the run instead of a random init (reflow's
    # warm start from the generating model); its model must be the one this config builds. "": random init
    init_from: str = ""
    # the EMA model's loss on this many fixed rows of val_split at every checkpoint (val_loss; 0: off), the metric a
    # sweep's early stopping compares (pipelines.train.validation)
    val_rows: int = 0
    val_split: str = "test"
    # sample quality while training (pipelines.chain.QualityWhileTraining, from `flowray train`): every eval_every
    # steps (a multiple of checkpoint_every; 0: off) the checkpoint is sampled (eval_samples, eval_solver with
    # eval_steps when fixed-step) and evaluated (FD / FID with its floor; bits/dim on eval_rows test rows, 0: the
    # whole split) in a Ray task beside the trainers, as `flowray sample` and `flowray evaluate` would
    eval_every: int = 0
    eval_samples: int = 500
    eval_solver: str = "dopri5"
    eval_steps: int = 20
    eval_nice: int = 19  # added to the scoring stages' OS niceness: they yield the cores the trainers want
    # a node label (a Ray custom resource) that the scorer and its stages' actors need, keeping them off the
    # trainers' nodes on a cluster with nodes started `ray start --resources='{"NAME": 1}'`; "": any node
    eval_resource: str = ""
    eval_rows: int = 200


@dataclass
class RayConfig:
    """The Ray cluster and the resources of the Train workers and the stream's pairing tasks."""

    address: str | None = None  # None: join a running cluster if RAY_ADDRESS is set, else start a local one
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional so Ray Data's read tasks keep a CPU on small machines
    gpus_per_worker: float = 1.0
    worker_resource: str = ""  # a node label (Ray custom resource) the Train workers need: they run only there
    preprocess_cpus: float = 0.25  # per pairing task of the training stream (it reads, preprocesses and pairs)
    preprocess_actors: int = 0  # most pairing tasks at once per worker's stream; 0: the spare CPUs / workers
    prefetch_batches: int = 2
    stream_chunk_tasks: int = 8  # a worker reads its stream as datasets of this many pairing tasks; 0: one dataset
    max_failures: int = 2  # a crashed worker (or node) is recovered from the last checkpoint, twice
    local_cpus: int = 4  # logical CPUs of a local Ray (at least the host's count); see pipelines.train.init_ray


@dataclass
class MlflowConfig:
    """Where runs are tracked and registered."""

    experiment: str = "flowray"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db
    register_as: str | None = None  # register the final model in the MLflow Model Registry under this name
    log_model: bool = True  # log the final EMA network as an MLflow Model (torch.export); false: the checkpoint alone
    flush_timeout_s: float = 120.0  # at the end of training, how long to wait for metrics queued in an outage
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, disk, network, GPU) of every node


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """section.key -> value, for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults when path is None), apply `section.key=value` overrides, validate."""
    cfg = load_sections(Config(), path, overrides)
    validate(cfg)
    return cfg


def schema() -> dict:
    """The JSON Schema of a training config file (`configs/train.schema.json`, which `python -m jobs.train --schema`
    writes), with the allowed values of the keys that name a registry entry."""
    choices = {
        "model.name": list(MODELS),
        "method.name": list(METHODS),
        "method.ot_scope": ["local", "global"],
        "method.time_sampling": list(TIME_SAMPLINGS),
        "optim.schedule": list(SCHEDULES),
        "train.precision": list(PRECISIONS),
    }
    return json_schema(Config(), "flowray training config (python -m jobs.train --config FILE)", choices)


def validate(cfg: Config) -> None:
    """Check every value; raise ConfigError naming the first bad key."""
    m, meth, o, t, r = cfg.model, cfg.method, cfg.optim, cfg.train, cfg.ray
    check(
        cfg.data.shuffle_window >= 1,
        "data.shuffle_window",
        cfg.data.shuffle_window,
        "must be >= 1 (rows; a window is at least one row group)",
    )
    check(cfg.data.buffer_batches >= 0, "data.buffer_batches", cfg.data.buffer_batches, "must be >= 0")
    check(m.name in MODELS, "model.name", m.name, f"allowed: {', '.join(MODELS)}")
    check(m.model_channels >= 1, "model.model_channels", m.model_channels, "must be >= 1")
    check(
        len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult),
        "model.channel_mult",
        m.channel_mult,
        "must be a non-empty list of integers >= 1",
    )
    check(m.num_res_blocks >= 1, "model.num_res_blocks", m.num_res_blocks, "must be >= 1")
    check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    check(0 <= m.label_dropout < 1, "model.label_dropout", m.label_dropout, "must be in [0, 1)")
    check(
        m.num_heads >= 1 and m.model_channels % m.num_heads == 0,
        "model.num_heads",
        m.num_heads,
        "must be >= 1 and divide model.model_channels",
    )
    check(meth.name in METHODS, "method.name", meth.name, f"allowed: {', '.join(METHODS)}")
    meanflow = meth.name in METHODS and METHODS[meth.name].two_times
    jumps = meth.name in METHODS and not METHODS[meth.name].velocity_field  # sampled in jumps: MeanFlow, distill
    one_step = meth.name in METHODS and METHODS[meth.name].one_step
    check(
        0 <= meth.meanflow_ratio <= 1 and (meanflow or meth.meanflow_ratio == 0.25),
        "method.meanflow_ratio",
        meth.meanflow_ratio,
        "must be in [0, 1], and only method.name=meanflow reads it (otherwise keep 0.25)",
    )
    check(
        0 <= meth.meanflow_p < math.inf and (meanflow or meth.meanflow_p == 1.0),
        "method.meanflow_p",
        meth.meanflow_p,
        "must be finite and >= 0, and only method.name=meanflow reads it (otherwise keep 1.0)",
    )
    check(
        not meanflow or m.dropout == 0,
        "model.dropout",
        m.dropout,
        "must be 0 with meanflow: its target's forward pass and its loss's would draw different dropout masks",
    )
    check(meth.ot_scope in ("local", "global"), "method.ot_scope", meth.ot_scope, "allowed: local, global")
    check(0 <= meth.sigma_min < 1, "method.sigma_min", meth.sigma_min, "must be in [0, 1)")
    check(meth.sigma is None or meth.sigma >= 0, "method.sigma", meth.sigma, "must be null or >= 0")
    check(
        meth.time_sampling in TIME_SAMPLINGS,
        "method.time_sampling",
        meth.time_sampling,
        f"allowed: {', '.join(TIME_SAMPLINGS)}",
    )
    check(
        meth.time_sampling == "uniform" or METHODS[meth.name].kind == "euclidean",
        "method.time_sampling",
        meth.time_sampling,
        f"{meth.name} is {METHODS[meth.name].kind} and draws t uniformly; allowed: uniform",
    )
    check(
        meth.time_sampling == "uniform" or not one_step,
        "method.time_sampling",
        meth.time_sampling,
        f"{meth.name} trains at t = 0 only and draws no times; allowed: uniform",
    )
    logit_normal = meth.time_sampling == "logit_normal"
    check(
        logit_normal or meth.time_loc == 0.0,
        "method.time_loc",
        meth.time_loc,
        "only method.time_sampling=logit_normal reads it (with uniform: keep 0.0)",
    )
    check(
        logit_normal or meth.time_scale == 1.0,
        "method.time_scale",
        meth.time_scale,
        "only method.time_sampling=logit_normal reads it (with uniform: keep 1.0)",
    )
    check(math.isfinite(meth.time_loc), "method.time_loc", meth.time_loc, "must be finite")
    check(meth.beta_min > 0, "method.beta_min", meth.beta_min, "must be > 0")
    check(
        meth.beta_max > meth.beta_min and math.isfinite(meth.beta_max),
        "method.beta_max",
        meth.beta_max,
        f"must be finite and > method.beta_min={meth.beta_min}",
    )
    check(math.isfinite(meth.time_scale) and meth.time_scale > 0, "method.time_scale", meth.time_scale, "must be > 0")
    if not METHODS[meth.name].needs_data:  # a method on a manifold or snapshots is checked with the data
        try:
            make_method(**method_kwargs(cfg))  # the parts' own checks (e.g. sbcfm needs sigma > 0)
        except ValueError as err:
            raise ConfigError(f"method: {err}") from None
    check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"allowed: {', '.join(SCHEDULES)}")
    check(
        o.decay_steps is None or o.decay_steps > o.warmup_steps,
        "optim.decay_steps",
        o.decay_steps,
        f"must be null or > optim.warmup_steps={o.warmup_steps}",
    )
    check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    check(o.power > 0, "optim.power", o.power, "must be > 0")
    check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    check(0 <= o.weight_decay < math.inf, "optim.weight_decay", o.weight_decay, "must be finite and >= 0")
    check(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "must be in [0, 1)")
    check(
        len(o.ema_sigma_rels) >= 1
        and len(set(o.ema_sigma_rels)) == len(o.ema_sigma_rels)
        and all(0 < s < SIGMA_REL_MAX for s in o.ema_sigma_rels),
        "optim.ema_sigma_rels",
        o.ema_sigma_rels,
        f"must be a non-empty list of distinct values in (0, {SIGMA_REL_MAX:.4f})",
    )
    check(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    check(t.batch_size >= 2, "train.batch_size", t.batch_size, "must be >= 2")
    check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    check(t.sample_every >= 0, "train.sample_every", t.sample_every, "must be >= 0")
    check(t.grid_size >= 1, "train.grid_size", t.grid_size, "must be >= 1")
    check(t.grid_steps >= 1, "train.grid_steps", t.grid_steps, "must be >= 1 (Euler steps of the sample grid)")
    check(t.num_to_keep >= 1, "train.num_to_keep", t.num_to_keep, "must be >= 1 (checkpoints kept; a resume needs one)")
    check(t.max_nonfinite >= 1, "train.max_nonfinite", t.max_nonfinite, "must be >= 1")
    check(t.ema_snapshot_every >= 0, "train.ema_snapshot_every", t.ema_snapshot_every, "must be >= 0 (0: off)")
    check(
        t.ema_snapshot_every == 0 or t.steps // t.ema_snapshot_every <= MAX_EMA_SNAPSHOTS,
        "train.ema_snapshot_every",
        t.ema_snapshot_every,
        f"gives {t.steps // max(t.ema_snapshot_every, 1)} snapshots of {t.steps} steps; at most "
        f"{MAX_EMA_SNAPSHOTS} are kept per run: take at least {-(-t.steps // MAX_EMA_SNAPSHOTS)}",
    )
    check(
        t.fail_at_step is None or 1 <= t.fail_at_step <= t.steps,
        "train.fail_at_step",
        t.fail_at_step,
        f"must be null or in [1, train.steps={t.steps}]",
    )
    check_name(t.run_name, "train.run_name")  # the run's folder under train.storage_path
    check(t.precision in PRECISIONS, "train.precision", t.precision, f"allowed: {', '.join(PRECISIONS)}")
    check(
        t.precision != "fp16" or r.use_gpu,
        "train.precision",
        t.precision,
        "fp16 needs a GPU (ray.use_gpu=true): CPUs have no fast fp16 and its gradients need a scaler; use fp32 "
        "or bf16 on CPU",
    )
    check(
        not t.channels_last or m.name == "unet",
        "train.channels_last",
        t.channels_last,
        f"a memory format of image batches: it needs model.name=unet, not {m.name}",
    )
    check(t.val_rows >= 0, "train.val_rows", t.val_rows, "must be >= 0 (0: no validation loss)")
    check(
        t.val_rows == 0 or METHODS[meth.name].prediction != "action",
        "train.val_rows",
        t.val_rows,
        f"{meth.name}'s loss differentiates the model, which the validation loss (no gradients) cannot: set 0",
    )
    check(
        t.eval_every >= 0 and t.eval_every % t.checkpoint_every == 0,
        "train.eval_every",
        t.eval_every,
        f"must be 0 (off) or a multiple of train.checkpoint_every={t.checkpoint_every} (a checkpoint is scored)",
    )
    check(t.eval_samples >= 2, "train.eval_samples", t.eval_samples, "must be >= 2 (a covariance needs two)")
    check(
        t.eval_solver in (*ADAPTIVE_METHODS, *FIXED_METHODS, JUMP),
        "train.eval_solver",
        t.eval_solver,
        f"allowed: {', '.join((*ADAPTIVE_METHODS, *FIXED_METHODS, JUMP))}",
    )
    check(
        t.eval_every == 0 or (t.eval_solver == JUMP) == jumps,
        "train.eval_solver",
        t.eval_solver,
        f"{meth.name} samples in {JUMP!r}s (train.eval_steps of them)"
        if jumps
        else f"{JUMP!r} is MeanFlow's sampler (and distill's); {meth.name} gives a velocity field: use an ODE solver",
    )
    check(
        t.eval_every == 0 or not one_step or t.eval_steps == 1,
        "train.eval_steps",
        t.eval_steps,
        f"{meth.name} is a one-step map: it samples in one jump; allowed: 1",
    )
    check(t.eval_steps >= 1, "train.eval_steps", t.eval_steps, "must be >= 1")
    check(t.eval_rows >= 0, "train.eval_rows", t.eval_rows, "must be >= 0 (0: the whole test split)")
    check(0 <= t.eval_nice <= 19, "train.eval_nice", t.eval_nice, "must be in [0, 19] (added to the OS niceness)")
    check_resource_name(t.eval_resource, "train.eval_resource")
    check(r.num_workers >= 1, "ray.num_workers", r.num_workers, "must be >= 1")
    check(
        t.fail_at_step is None or 0 <= t.fail_rank < r.num_workers,
        "train.fail_rank",
        t.fail_rank,
        f"must be a worker rank in [0, {r.num_workers - 1}]",
    )
    check(r.cpus_per_worker > 0, "ray.cpus_per_worker", r.cpus_per_worker, "must be > 0")
    check_resource_name(r.worker_resource, "ray.worker_resource")
    check(r.preprocess_cpus > 0, "ray.preprocess_cpus", r.preprocess_cpus, "must be > 0")
    check(
        r.preprocess_actors >= 0,
        "ray.preprocess_actors",
        r.preprocess_actors,
        "must be >= 0 (0: as many as the CPUs the train workers leave)",
    )
    check(
        r.stream_chunk_tasks >= 0,
        "ray.stream_chunk_tasks",
        r.stream_chunk_tasks,
        "must be >= 0 (0: one dataset for the whole run)",
    )
    check(r.max_failures >= -1, "ray.max_failures", r.max_failures, "must be >= 0, or -1 for unlimited")
    check(r.prefetch_batches >= 0, "ray.prefetch_batches", r.prefetch_batches, "must be >= 0")
    check(r.local_cpus >= 1, "ray.local_cpus", r.local_cpus, "must be >= 1")
    check(
        not r.use_gpu or r.gpus_per_worker > 0,
        "ray.gpus_per_worker",
        r.gpus_per_worker,
        "must be > 0 with ray.use_gpu=true",
    )
    check(cfg.mlflow.flush_timeout_s >= 0, "mlflow.flush_timeout_s", cfg.mlflow.flush_timeout_s, "must be >= 0")
    check_name(cfg.mlflow.experiment, "mlflow.experiment")  # its artifacts' folder under the store's artifact root
    if cfg.mlflow.register_as is not None:
        check_name(cfg.mlflow.register_as, "mlflow.register_as", also=":")  # MLflow's registry refuses ':' too
        check(
            cfg.mlflow.log_model,
            "mlflow.register_as",
            cfg.mlflow.register_as,
            "needs mlflow.log_model=true: the registry holds the MLflow Model",
        )


def model_kwargs(cfg: Config, data) -> dict:
    """Arguments that rebuild the model with `fm.models.build_model` (stored in every checkpoint), for the rows of
    a `pipelines.core.manifest.DataSpec`."""
    m = cfg.model
    num_classes = data.num_classes if m.class_conditional else None
    if m.name == "mlp":
        kwargs = {"dim": int(data.shape[0]), "hidden": m.hidden, "depth": m.depth, "num_classes": num_classes}
        if getattr(data, "manifold", None):
            kwargs["manifold"] = data.manifold  # a tangent field on the data's manifold
        if METHODS[cfg.method.name].prediction == "action":
            # a scalar action, whose time derivative is part of its loss: smooth time features
            kwargs.update(out_dim=1, time_scale=1.0)
        return {**kwargs, **_two_times(cfg)}
    h, _, c = data.shape
    return {
        "image_size": h,
        "in_channels": c,
        "model_channels": m.model_channels,
        "channel_mult": list(m.channel_mult),
        "num_res_blocks": m.num_res_blocks,
        "attention_resolutions": list(m.attention_resolutions),
        "dropout": m.dropout,
        "num_heads": m.num_heads,
        "num_classes": num_classes,
        **_two_times(cfg),
    }


def _two_times(cfg: Config) -> dict:
    """MeanFlow's model takes the interval's end r too, with smooth time features: its target holds the model's time
    derivative (`fm.meanflow`; the high-frequency default trains far worse, tests/fm/test_meanflow.py)."""
    return {"two_times": True, "time_scale": 1.0} if METHODS[cfg.method.name].two_times else {}


def method_kwargs(cfg: Config, data=None) -> dict:
    """Arguments of `fm.methods.make_method`; with the rows' `DataSpec`, also their manifold or snapshot times."""
    kwargs = dict(dataclasses.asdict(cfg.method))
    if data is not None and data.manifold:
        kwargs["manifold"] = data.manifold
    if data is not None and data.times:
        kwargs["times"] = list(data.times)
    return kwargs
