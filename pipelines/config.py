"""Run configuration: one dataclass per concern, loaded from YAML, overridden by `section.key=value`, validated
in full before any Ray work starts. Errors name the key, the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fm.methods import METHODS, make_method
from fm.models import MODELS
from fm.solvers import ADAPTIVE_METHODS, FIXED_METHODS, check_solver
from fm.training import SCHEDULES
from pipelines.errors import ConfigError  # noqa: F401  (re-exported: every job imports it from here)
from pipelines.memory import check_fits, model_item_bytes


@dataclass
class DataConfig:
    shards: str = "data/digits"  # an ingest output directory (holds manifest.json)
    split: str = "train"
    hflip: bool = False  # random horizontal flips in preprocessing
    buffer_batches: int = 96  # paired steps a worker's reader thread keeps ready on its device
    shuffle_window: int = 65_536  # rows shuffled together in each pass, after the row groups are (pipelines.stream)


@dataclass
class ModelConfig:
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
    name: str = "fm_ot"
    sigma_min: float = 1e-4
    sigma: float | None = None  # straight-line path noise; null: the method's default (fm.methods.METHODS)
    ot_scope: str = "local"  # otcfm: "local" (per worker) or "global" (one plan over all workers' batches)
    beta_min: float = 0.1
    beta_max: float = 20.0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"  # after warm-up: constant, cosine or polynomial decay (fm.training.lr_at)
    decay_steps: int | None = None  # the step at which the decay reaches min_lr; null: train.steps
    min_lr: float = 0.0
    power: float = 1.0  # polynomial decay exponent
    grad_clip: float = 1.0
    ema_decay: float = 0.999


@dataclass
class TrainConfig:
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
    # autocast of the forward pass: auto (bf16 on a GPU, fp32 on CPU) | fp32 | bf16 | fp16 (GPU only, GradScaler)
    precision: str = "auto"
    compile: bool = False  # torch.compile the training model (after the DDP wrapper; the checkpoint is unchanged)
    channels_last: bool = False  # NHWC memory format for the UNet and its batches (faster convolutions on GPUs)


@dataclass
class RayConfig:
    address: str | None = None  # None: join a running cluster if RAY_ADDRESS is set, else start a local one
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional so Ray Data's read tasks keep a CPU on small machines
    gpus_per_worker: float = 1.0
    preprocess_cpus: float = 0.25  # per pairing task of the training stream (it reads, preprocesses and pairs)
    preprocess_actors: int = 0  # most pairing tasks at once per worker's stream; 0: the spare CPUs / workers
    prefetch_batches: int = 2
    max_failures: int = 2  # a crashed worker (or node) is recovered from the last checkpoint, twice
    local_cpus: int = 4  # logical CPUs of a local Ray (at least the host's count); see pipelines.train.init_ray


@dataclass
class MlflowConfig:
    experiment: str = "flowray"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db
    register_as: str | None = None  # register the final model in the MLflow Model Registry under this name
    flush_timeout_s: float = 120.0  # at the end of training, how long to wait for metrics queued in an outage


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


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    t = str(typ)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {t})")
    try:
        if t.startswith("list"):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(value, int):
                value = [value]
            if not isinstance(value, list):
                raise TypeError
            return [int(v) for v in value]
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise TypeError
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {t}") from None


def _parse_value(key: str, text: str) -> Any:
    """A `--set` value as YAML (so lists, numbers, booleans and null read as they do in the config files)."""
    try:
        return yaml.safe_load(text) if text else text
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {text!r} is not a valid value ({str(err).splitlines()[0]})") from None


def _set(obj, section: str, key: str, value: Any) -> None:
    """Set one field of a config dataclass, coerced to its type; raise ConfigError naming the key."""
    types = {f.name: f.type for f in fields(obj)}
    if key not in types:
        raise ConfigError(f"unknown key {section}.{key}; allowed in {section}: {', '.join(types)}")
    setattr(obj, key, _coerce(f"{section}.{key}", value, types[key]))


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown section {section!r}; allowed: {', '.join(sections)}")
    _set(getattr(cfg, section), section, key, value)


def apply_overrides(obj, section: str, items: list[str]) -> None:
    """Apply `section.key=value` (or `key=value`) items to one config dataclass (a job's `sample` or `eval`
    section), with the same parsing, coercion and errors as `load_config`."""
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like {section}.key=value")
        key = key.removeprefix(f"{section}.")
        _set(obj, section, key, _parse_value(f"{section}.{key}", value))


_SECTIONS = [f.name for f in fields(Config)]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults when path is None), apply `section.key=value` overrides, validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not a YAML file ({str(err).splitlines()[0]})") from None
        # an empty file is not "all defaults": with the default run name it would continue whatever run has it
        if raw is None or raw == {}:
            raise ConfigError(f"{path} is empty; a config maps sections ({', '.join(_SECTIONS)}) to keys. "
                              "Omit --config to use the defaults")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections ({', '.join(_SECTIONS)}); "
                              f"got a {type(raw).__name__}")
        for section, values in raw.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{path}: {section!r} is not a section; allowed: {', '.join(_SECTIONS)} "
                                  "(every key goes under its section, e.g. 'train:' then '  steps: 500')")
            if values is None:
                raise ConfigError(f"{path}: section {section!r} is empty; give its keys or remove it")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value)
    for item in overrides or []:
        lhs, eq, rhs = item.partition("=")
        if not eq or "." not in lhs:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, key = lhs.split(".", 1)
        _apply(cfg, section, key, _parse_value(lhs, rhs))
    validate(cfg)
    return cfg


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device_type: str):
    """The autocast dtype of a precision setting on a device ("cpu" or "cuda"); None: plain fp32."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def validate(cfg: Config) -> None:
    """Check every value; raise ConfigError naming the first bad key."""
    m, meth, o, t, r = cfg.model, cfg.method, cfg.optim, cfg.train, cfg.ray
    _check(cfg.data.shuffle_window >= 1, "data.shuffle_window", cfg.data.shuffle_window,
           "must be >= 1 (rows; a window is at least one row group)")
    _check(cfg.data.buffer_batches >= 0, "data.buffer_batches", cfg.data.buffer_batches, "must be >= 0")
    _check(m.name in MODELS, "model.name", m.name, f"allowed: {', '.join(MODELS)}")
    _check(m.model_channels >= 1, "model.model_channels", m.model_channels, "must be >= 1")
    _check(len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult), "model.channel_mult",
           m.channel_mult, "must be a non-empty list of integers >= 1")
    _check(m.num_res_blocks >= 1, "model.num_res_blocks", m.num_res_blocks, "must be >= 1")
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(0 <= m.label_dropout < 1, "model.label_dropout", m.label_dropout, "must be in [0, 1)")
    _check(m.num_heads >= 1 and m.model_channels % m.num_heads == 0, "model.num_heads", m.num_heads,
           "must be >= 1 and divide model.model_channels")
    _check(meth.name in METHODS, "method.name", meth.name, f"allowed: {', '.join(METHODS)}")
    _check(meth.ot_scope in ("local", "global"), "method.ot_scope", meth.ot_scope, "allowed: local, global")
    _check(0 <= meth.sigma_min < 1, "method.sigma_min", meth.sigma_min, "must be in [0, 1)")
    _check(meth.sigma is None or meth.sigma >= 0, "method.sigma", meth.sigma, "must be null or >= 0")
    if METHODS[meth.name].kind == "euclidean":  # the other kinds need the data's manifold or times (check_data)
        try:
            make_method(**method_kwargs(cfg))  # the parts' own checks (e.g. sbcfm needs sigma > 0)
        except ValueError as err:
            raise ConfigError(f"method: {err}") from None
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"allowed: {', '.join(SCHEDULES)}")
    _check(o.decay_steps is None or o.decay_steps > o.warmup_steps, "optim.decay_steps", o.decay_steps,
           f"must be null or > optim.warmup_steps={o.warmup_steps}")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _check(o.power > 0, "optim.power", o.power, "must be > 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _check(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "must be in [0, 1)")
    _check(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    _check(t.batch_size >= 2, "train.batch_size", t.batch_size, "must be >= 2")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(t.sample_every >= 0, "train.sample_every", t.sample_every, "must be >= 0")
    _check(t.grid_size >= 1, "train.grid_size", t.grid_size, "must be >= 1")
    _check(t.max_nonfinite >= 1, "train.max_nonfinite", t.max_nonfinite, "must be >= 1")
    _check(t.fail_at_step is None or 1 <= t.fail_at_step <= t.steps, "train.fail_at_step", t.fail_at_step,
           f"must be null or in [1, train.steps={t.steps}]")
    _check(bool(t.run_name) and "/" not in t.run_name, "train.run_name", t.run_name, "must be a non-empty name")
    _check(t.precision in PRECISIONS, "train.precision", t.precision, f"allowed: {', '.join(PRECISIONS)}")
    _check(t.precision != "fp16" or r.use_gpu, "train.precision", t.precision,
           "fp16 needs a GPU (ray.use_gpu=true): CPUs have no fast fp16 and its gradients need a scaler; use fp32 "
           "or bf16 on CPU")
    _check(not t.channels_last or m.name == "unet", "train.channels_last", t.channels_last,
           f"a memory format of image batches: it needs model.name=unet, not {m.name}")
    _check(r.num_workers >= 1, "ray.num_workers", r.num_workers, "must be >= 1")
    _check(t.fail_at_step is None or 0 <= t.fail_rank < r.num_workers, "train.fail_rank", t.fail_rank,
           f"must be a worker rank in [0, {r.num_workers - 1}]")
    _check(r.cpus_per_worker > 0, "ray.cpus_per_worker", r.cpus_per_worker, "must be > 0")
    _check(r.preprocess_cpus > 0, "ray.preprocess_cpus", r.preprocess_cpus, "must be > 0")
    _check(r.preprocess_actors >= 0, "ray.preprocess_actors", r.preprocess_actors,
           "must be >= 0 (0: as many as the CPUs the train workers leave)")
    _check(r.max_failures >= -1, "ray.max_failures", r.max_failures, "must be >= 0, or -1 for unlimited")
    _check(bool(cfg.mlflow.experiment), "mlflow.experiment", cfg.mlflow.experiment, "must be non-empty")


# --- the batch stages' sections (jobs.sample: sample.*, jobs.evaluate: eval.*) ---------------------------------

SOLVERS = ADAPTIVE_METHODS + FIXED_METHODS + ("sde",)


@dataclass
class SampleConfig:
    num_samples: int = 1000
    solver: str = "dopri5"  # any torchdiffeq method, or "sde" (Euler–Maruyama)
    atol: float = 1e-5
    rtol: float = 1e-5
    steps: int = 100  # fixed-step methods and sde
    sde_g: float = 0.0  # diffusion of the flow SDE; 0 means the VP reverse SDE's g(t) = sqrt(beta) (VP methods)
    cfg_scale: float = 1.0
    label: int = -1  # class for conditional models; -1 cycles through the classes by id
    seed: int = 0
    block_size: int = 64
    blocks_per_call: int = 1  # Ray batch size, in blocks
    actors: int = 0  # 0: as many as the cluster's cores (or GPUs) and memory hold (`pipelines.runtime.actor_pool`)
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    write_png: bool = False
    fail_at_block: int = -1  # test hook: the actor raises once when it reaches this block
    # the network's evaluations under autocast: fp32 | bf16 | fp16 (GPU actors only); the ODE state stays fp32
    precision: str = "fp32"


def validate_sample_config(c: SampleConfig, method: str | None = None, method_kwargs: dict | None = None) -> None:
    """Check every sample.* value; with the checkpoint's method, also that the solver suits it."""
    _check(c.num_samples >= 1, "sample.num_samples", c.num_samples, "must be >= 1")
    _check(c.solver in SOLVERS, "sample.solver", c.solver, f"allowed: {', '.join(SOLVERS)}")
    _check(c.atol > 0 and c.rtol > 0, "sample.atol/rtol", (c.atol, c.rtol), "must be > 0")
    _check(c.steps >= 1, "sample.steps", c.steps, "must be >= 1")
    _check(c.sde_g >= 0, "sample.sde_g", c.sde_g, "must be >= 0")
    _check(c.block_size >= 1, "sample.block_size", c.block_size, "must be >= 1")
    _check(c.blocks_per_call >= 1, "sample.blocks_per_call", c.blocks_per_call, "must be >= 1")
    _check(c.actors >= 0, "sample.actors", c.actors, "must be >= 1, or 0 for as many as the cluster holds")
    _check(c.cpus_per_actor > 0, "sample.cpus_per_actor", c.cpus_per_actor, "must be > 0")
    _check(c.gpus_per_actor >= 0, "sample.gpus_per_actor", c.gpus_per_actor, "must be >= 0")
    _check(c.precision in PRECISIONS[1:], "sample.precision", c.precision, f"allowed: {', '.join(PRECISIONS[1:])}")
    _check(c.precision != "fp16" or c.gpus_per_actor > 0, "sample.precision", c.precision,
           "fp16 needs GPU actors (sample.gpus_per_actor > 0); use fp32 or bf16 on CPU")
    if method in METHODS and METHODS[method].kind == "riemannian" and c.solver in FIXED_METHODS:
        from fm.riemannian import MANIFOLD_SOLVERS

        _check(c.solver in MANIFOLD_SOLVERS, "sample.solver", c.solver,
               f"a fixed-step solver on a manifold must be one of {', '.join(MANIFOLD_SOLVERS)} (or use an "
               "adaptive one)")
    if c.solver == "sde" and method is not None:
        try:
            make_method(**(method_kwargs or {"name": method})).sde_diffusion(c.sde_g)
        except ValueError as err:
            raise ConfigError(f"sample.sde_g: {c.sde_g!r} is not allowed with sample.solver=sde for this "
                              f"{method} checkpoint: {err}") from None


@dataclass
class EvalConfig:
    split: str = "test"
    max_images: int = 0  # 0: the whole split
    draws: int = 1  # K dequantization draws
    divergence: str = "hutchinson"  # or "exact"
    probes: int = 1  # H Hutchinson probes
    probe_kind: str = "rademacher"  # or "gaussian"
    solver: str = "dopri5"  # the likelihood ODE: any torchdiffeq method
    steps: int | None = None  # fixed-step solvers only
    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 64  # the likelihood's fixed blocks: rows solved together (an adaptive solver shares its steps)
    blocks_per_call: int = 1  # Ray batch size, in blocks (changes nothing but scheduling)
    actors: int = 0  # 0: as many as the cluster's cores (or GPUs) and memory hold (`pipelines.runtime.actor_pool`)
    cpus_per_actor: float = 0.5
    seed: int = 0
    classifier_epochs: int = 15
    features: str = "auto"  # inception (FID), classifier, or auto: inception from 16x16 up, else the classifier
    reference_split: str = "train"  # FID/FD against this split (the papers' convention)
    reference_max: int = 0  # 0: the whole reference split; else about this many of its images (by id hash)
    floor_split: str = "test"  # held-out real images scored against the reference: the floor ("": none)
    subset_size: int = 2000  # features kept for KID and precision/recall
    feature_batch: int = 64
    gpus_per_actor: float = 0.0


FEATURES = ("auto", "inception", "classifier")


def validate_eval_config(c: EvalConfig) -> None:
    """Check every eval.* value, solver settings included, before any Ray work."""
    _check(c.draws >= 1, "eval.draws", c.draws, "must be >= 1")
    _check(c.divergence in ("exact", "hutchinson"), "eval.divergence", c.divergence, "allowed: exact, hutchinson")
    _check(c.probes >= 1, "eval.probes", c.probes, "must be >= 1")
    _check(c.draws == 1 or c.divergence == "exact", "eval.draws", c.draws,
           "K > 1 dequantization draws need eval.divergence=exact (Hutchinson estimates make their "
           "log-mean-exp biased low)")
    _check(c.probe_kind in ("rademacher", "gaussian"), "eval.probe_kind", c.probe_kind,
           "allowed: rademacher, gaussian")
    _check(c.batch_size >= 1, "eval.batch_size", c.batch_size, "must be >= 1")
    _check(c.blocks_per_call >= 1, "eval.blocks_per_call", c.blocks_per_call, "must be >= 1")
    _check(c.actors >= 0, "eval.actors", c.actors, "must be >= 1, or 0 for as many as the cluster holds")
    _check(c.cpus_per_actor > 0, "eval.cpus_per_actor", c.cpus_per_actor, "must be > 0")
    _check(c.max_images >= 0, "eval.max_images", c.max_images, "must be >= 0")
    _check(c.classifier_epochs >= 1, "eval.classifier_epochs", c.classifier_epochs, "must be >= 1")
    _check(c.features in FEATURES, "eval.features", c.features, f"allowed: {', '.join(FEATURES)}")
    _check(c.reference_max == 0 or c.reference_max >= 10, "eval.reference_max", c.reference_max,
           "must be 0 (the whole split) or >= 10")
    _check(c.subset_size >= 10, "eval.subset_size", c.subset_size, "must be >= 10")
    _check(c.feature_batch >= 1, "eval.feature_batch", c.feature_batch, "must be >= 1")
    _check(c.gpus_per_actor >= 0, "eval.gpus_per_actor", c.gpus_per_actor, "must be >= 0")
    try:
        check_solver(c.solver, c.steps, c.atol, c.rtol)
    except ValueError as err:
        key = "eval.steps" if "steps" in str(err) else "eval.atol/rtol" if "atol" in str(err) else "eval.solver"
        raise ConfigError(f"{key}: {err}") from None


def check_data(cfg: Config):
    """Validate the data section against the ingest manifest (before Ray starts); returns the `Manifest`."""
    from pipelines.manifest import Manifest

    try:
        manifest = Manifest.load(cfg.data.shards)
    except ConfigError as err:
        raise ConfigError(f"data.shards: {err}") from None
    _check(cfg.data.split in manifest.splits, "data.split", cfg.data.split,
           f"splits in {cfg.data.shards}: {', '.join(manifest.splits)}")
    if manifest.data.is_image:
        size = manifest.data.shape[0]
        levels = len(cfg.model.channel_mult)
        _check(cfg.model.name == "unet", "model.name", cfg.model.name, "image data needs the unet")
        _check(size % (2 ** (levels - 1)) == 0, "model.channel_mult", cfg.model.channel_mult,
               f"{levels} levels need the image size {size} divisible by {2 ** (levels - 1)}")
    else:
        _check(cfg.model.name == "mlp", "model.name", cfg.model.name, "point data needs the mlp")
    try:  # the method suits the data: Riemannian methods need a manifold, snapshot methods snapshots
        make_method(**method_kwargs(cfg, manifest.data))
    except ValueError as err:
        raise ConfigError(f"method.name: {err} ({cfg.data.shards} holds {manifest.data.source})") from None
    if cfg.model.class_conditional:
        _check(manifest.raw.get("labelled", True) and manifest.data.num_classes > 0, "model.class_conditional",
               True, f"{cfg.data.shards} was ingested unlabelled (no classes to condition on)")
    count = manifest.count(cfg.data.split)
    _check(count >= cfg.train.batch_size * cfg.ray.num_workers, "train.batch_size", cfg.train.batch_size,
           f"the {cfg.data.split} split has {count} rows, fewer than batch_size x num_workers")
    # a batch one Train worker could not hold: its activations, and the paired steps its reader keeps ready
    cells = 2 * 4 * int(np.prod(manifest.data.model_shape))  # x_0 and x_1 of one item, float32
    check_fits("train.batch_size", cfg.train.batch_size,
               model_item_bytes(cfg.model.name, model_kwargs(cfg, manifest.data), training=True)
               + cfg.data.buffer_batches * cells, "one Train worker",
               hint=": activations estimated from the model's feature maps, and data.buffer_batches "
                    f"({cfg.data.buffer_batches}) paired steps kept ready")
    return manifest


def model_kwargs(cfg: Config, data) -> dict:
    """Arguments that rebuild the model with `fm.models.build_model` (stored in every checkpoint), for the rows of
    a `pipelines.manifest.DataSpec`."""
    m = cfg.model
    num_classes = data.num_classes if m.class_conditional else None
    if m.name == "mlp":
        kwargs = {"dim": int(data.shape[0]), "hidden": m.hidden, "depth": m.depth, "num_classes": num_classes}
        if getattr(data, "manifold", None):
            kwargs["manifold"] = data.manifold  # a tangent field on the data's manifold
        if METHODS[cfg.method.name].prediction == "action":
            # a scalar action, whose time derivative is part of its loss: smooth time features
            kwargs.update(out_dim=1, time_scale=1.0)
        return kwargs
    h, _, c = data.shape
    return {"image_size": h, "in_channels": c, "model_channels": m.model_channels,
            "channel_mult": list(m.channel_mult), "num_res_blocks": m.num_res_blocks,
            "attention_resolutions": list(m.attention_resolutions), "dropout": m.dropout, "num_heads": m.num_heads,
            "num_classes": num_classes}


def method_kwargs(cfg: Config, data=None) -> dict:
    """Arguments of `fm.methods.make_method`; with the rows' `DataSpec`, also their manifold or snapshot times."""
    kwargs = dict(dataclasses.asdict(cfg.method))
    if data is not None and data.manifold:
        kwargs["manifold"] = data.manifold
    if data is not None and data.times:
        kwargs["times"] = list(data.times)
    return kwargs


DEFAULT_STORE = Path("outputs") / "mlflow.db"  # artifacts beside it in outputs/mlartifacts (never the source tree)


def tracking_uri(cfg: Config | None = None) -> str:
    """The MLflow tracking URI: config, else $MLFLOW_TRACKING_URI, else sqlite at outputs/mlflow.db (created)."""
    uri = (cfg.mlflow.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = (Path.cwd() / DEFAULT_STORE).resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def dump(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=1)
