"""Distributed CFM training: Ray Data streams parquet shards into Ray Train TorchTrainer workers (DDP).

Driver: validate config and data, open the MLflow run, build the dataset and the trainer, fit, report.
Workers: rebuild model and method from `fm`, resume from `ray.train.get_checkpoint()`, train, report every
`checkpoint_every` steps (every rank calls report), rank 0 logs to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.config import Config, check_data, method_kwargs, model_kwargs, tracking_uri
from pipelines.ingest import shard_paths


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (e.g. too many non-finite losses)."""


# --- data ------------------------------------------------------------------------------------------------------


class Preprocess:
    """Ray Data map stage: raw uint8 HWC bytes -> float32 [B, C, H, W] in [-1, 1] (optional random h-flip);
    point rows -> float32 [B, D]."""

    def __init__(self, shape: list[int], kind: str, hflip: bool, seed: int):
        self.shape, self.kind, self.hflip = tuple(shape), kind, hflip
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw = b"".join(batch["image"])
        if self.kind == "points":
            x = np.frombuffer(raw, dtype=np.float32).reshape(-1, *self.shape)
        else:
            u8 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, *self.shape).transpose(0, 3, 1, 2)
            x = u8.astype(np.float32) / 127.5 - 1.0  # as fm.data.to_model_space
            if self.hflip:
                flip = self.rng.random(x.shape[0]) < 0.5
                x[flip] = x[flip][..., ::-1]
        return {"x": np.ascontiguousarray(x), "y": batch["label"].astype(np.int64)}


def build_dataset(cfg: Config, manifest: dict):
    """The streaming training dataset: read_parquet over the split's shards, preprocessed on CPU."""
    import ray.data

    ds = ray.data.read_parquet(shard_paths(cfg.data.shards, cfg.data.split)).select_columns(["image", "label"])
    if cfg.data.cache:
        # Decoded rows are kept in Ray's object store (not the driver) and flips are applied on the fly.
        ds = ds.materialize()
    if cfg.data.repeat > 1:
        # Each pass over a streaming split restarts its executor (about a second); on a small data set that
        # start-up dominates the step time, so one Ray Data epoch spans several passes.
        ds = ds.union(*([ds] * (cfg.data.repeat - 1)))
    return ds.map_batches(Preprocess, fn_constructor_args=(manifest["shape"], manifest["kind"], cfg.data.hflip,
                                                           cfg.train.seed),
                          batch_format="numpy", batch_size=256, num_cpus=cfg.ray.preprocess_cpus,
                          compute=_actor_pool(1))


def _actor_pool(n: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=n)


# --- worker ----------------------------------------------------------------------------------------------------


def _step_generator(seed: int, rank: int, step: int, device) -> torch.Generator:
    """Noise, times and pairings of a step depend only on (seed, rank, step), so a resumed run repeats them."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    return g


def _batches(shard, batch_size: int, prefetch: int, device):
    """Endless stream of (x, y) from this worker's dataset shard, epoch after epoch."""
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch, drop_last=True,
                                              device=device):
            yield batch["x"], batch["y"]


def train_loop_per_worker(loop_cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from fm.ema import EMA
    from fm.methods import make_method
    from fm.models import build_model
    from fm.training import train_step, warmup_lr
    from pipelines.checkpoint import load_state, save_checkpoint
    from pipelines.tracking import SafeLogger

    cfg = loop_cfg["config"]
    t_cfg, o_cfg, r_cfg = cfg["train"], cfg["optim"], cfg["ray"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t_cfg["seed"])  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(loop_cfg["model_name"], **loop_cfg["model_kwargs"]).to(device)
    method = make_method(**loop_cfg["method_kwargs"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=o_cfg["lr"], weight_decay=o_cfg["weight_decay"])
    ema = EMA(model, o_cfg["ema_decay"])
    step, resumed_nonfinite = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_state(d, "model"))
            ema.load_state_dict(load_state(d, "ema"))
            optimizer.load_state_dict(load_state(d, "optimizer"))
            meta = json.loads((Path(d) / "meta.json").read_text())
            step, resumed_nonfinite = meta["step"], meta.get("nonfinite_total", 0)
    ddp_model = ray.train.torch.prepare_model(model)
    logger = SafeLogger(loop_cfg["tracking_uri"], loop_cfg["run_id"]) if rank == 0 else None
    if logger and step == 0:
        logger.params(loop_cfg["flat_config"])
    autocast = torch.bfloat16 if device.type == "cuda" else None
    num_classes = loop_cfg["model_kwargs"].get("num_classes")
    shard = ray.train.get_dataset_shard("train")
    batches = _batches(shard, t_cfg["batch_size"], r_cfg["prefetch_batches"], device)
    nonfinite_run, nonfinite_total = 0, resumed_nonfinite
    window = {"loss": [], "grad_norm": [], "wait": 0.0, "total": 0.0, "ot": 0.0, "n": 0}
    last_metrics: dict = {"step": step}

    def report() -> None:
        """Every rank reports; rank 0 attaches the checkpoint."""
        metrics = dict(last_metrics, step=step, nonfinite_total=nonfinite_total)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, step=step, model=model, ema_state=ema.state_dict(), optimizer=optimizer,
                                model_name=loop_cfg["model_name"], model_kwargs=loop_cfg["model_kwargs"],
                                method_kwargs=loop_cfg["method_kwargs"], config=cfg,
                                extra={"mlflow_run_id": loop_cfg["run_id"], "manifest": loop_cfg["manifest"],
                                       "nonfinite_total": nonfinite_total})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    while step < t_cfg["steps"]:
        t_start = time.perf_counter()
        x_1, y = next(batches)
        t_data = time.perf_counter() - t_start
        if t_cfg["fail_at_step"] == step + 1 and rank == t_cfg["fail_rank"]:
            marker = Path(loop_cfg["fault_marker"])
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"injected failure at step {step + 1} on rank {rank}\n")
                raise RuntimeError(f"injected failure (train.fail_at_step={step + 1}) on rank {rank}")
        if num_classes is not None:
            drop = torch.rand(y.shape, generator=_step_generator(t_cfg["seed"] + 7, rank, step, "cpu")).to(device)
            y = torch.where(drop < cfg["model"]["label_dropout"], torch.full_like(y, num_classes), y)
        else:
            y = None
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, o_cfg["lr"], o_cfg["warmup_steps"])
        g = _step_generator(t_cfg["seed"], rank, step, device)
        res = train_step(ddp_model, method, optimizer, x_1, y, g, o_cfg["grad_clip"], autocast)
        # every rank sees the same all-reduced gradients, so all agree on skipping a non-finite step
        # (a rank whose own loss alone is non-finite poisons the shared gradients, so it is skipped everywhere)
        if not res.finite:
            nonfinite_run += 1
            nonfinite_total += 1
            if nonfinite_run >= t_cfg["max_nonfinite"]:
                raise TrainingError(f"{nonfinite_run} non-finite losses in a row at step {step + 1} "
                                    f"(train.max_nonfinite={t_cfg['max_nonfinite']}); lower optim.lr or check data")
        else:
            nonfinite_run = 0
            ema.update(model)
        step += 1
        window["loss"].append(res.loss)
        window["grad_norm"].append(res.grad_norm)
        window["wait"] += t_data
        window["total"] += time.perf_counter() - t_start
        window["ot"] += method.coupling.last_solve_seconds
        window["n"] += 1
        if step % t_cfg["log_every"] == 0 or step == t_cfg["steps"]:
            finite = [v for v in window["loss"] if np.isfinite(v)]
            last_metrics = {
                "loss": float(np.mean(finite)) if finite else float("nan"),
                "grad_norm": float(np.nanmean(window["grad_norm"])) if finite else float("nan"),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": window["n"] * t_cfg["batch_size"] * world / max(window["total"], 1e-9),
                "data_wait_fraction": window["wait"] / max(window["total"], 1e-9),
                "ot_solve_s": window["ot"] / window["n"],
                "nonfinite_total": nonfinite_total,
            }
            if logger:
                logger.metrics(last_metrics, step)
            window = {"loss": [], "grad_norm": [], "wait": 0.0, "total": 0.0, "ot": 0.0, "n": 0}
        if logger and t_cfg["sample_every"] and step % t_cfg["sample_every"] == 0:
            _log_grid(logger, ema.module, method, loop_cfg, step, device)
        if step % t_cfg["checkpoint_every"] == 0 or step == t_cfg["steps"]:
            report()
    if logger:
        if t_cfg["sample_every"] == 0 or t_cfg["steps"] % t_cfg["sample_every"]:
            _log_grid(logger, ema.module, method, loop_cfg, step, device)
        _log_final_model(logger, model, ema, loop_cfg, cfg, step)
        logger.metrics({"final_step": step, "tracking_failures": logger.failures}, step)


def _log_grid(logger, ema_model, method, loop_cfg: dict, step: int, device) -> None:
    """Sample a grid with the EMA model (Euler, fixed noise) and log it as samples/step_XXXXXX.png."""
    from fm.data import to_uint8
    from fm.solvers import ode_sample
    from pipelines.images import save_grid

    t_cfg = loop_cfg["config"]["train"]
    if loop_cfg["manifest"]["kind"] != "image":
        return
    h, w, c = loop_cfg["manifest"]["shape"]
    g = torch.Generator().manual_seed(1234)
    x_0 = torch.randn(t_cfg["grid_size"], c, h, w, generator=g).to(device)
    num_classes = loop_cfg["model_kwargs"].get("num_classes")
    y = torch.arange(t_cfg["grid_size"], device=device) % num_classes if num_classes else None
    with torch.no_grad():
        x = ode_sample(method.velocity(ema_model, y), x_0, "euler", steps=t_cfg["grid_steps"], t_1=method.t_max).x_1
    with tempfile.TemporaryDirectory() as tmp:
        path = save_grid(to_uint8(x), Path(tmp) / f"step_{step:06d}.png")
        logger.artifact(path, "samples")


def _log_final_model(logger, model, ema, loop_cfg: dict, cfg: dict, step: int) -> None:
    from pipelines.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, step=step, model=model, ema_state=ema.state_dict(), optimizer=None,
                        model_name=loop_cfg["model_name"], model_kwargs=loop_cfg["model_kwargs"],
                        method_kwargs=loop_cfg["method_kwargs"], config=cfg,
                        extra={"mlflow_run_id": loop_cfg["run_id"], "manifest": loop_cfg["manifest"]})
        logger.artifact(tmp, "model")


# --- driver ----------------------------------------------------------------------------------------------------


def init_ray(address: str | None, local_cpus: int = 4) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a local one.

    A local Ray gets at least `local_cpus` logical CPUs: Ray Data's read tasks ask for a whole CPU, and on a
    2-core host the train workers and preprocessing actors would otherwise leave none, hanging the job.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=max(os.cpu_count() or 1, local_cpus), dashboard_host="127.0.0.1",  # Train V2 needs
                 log_to_driver=True)  # the dashboard's state API


def run_training(cfg: Config) -> dict:
    """Train per the config; returns the job's key results (run id, checkpoint path, final metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.tracking import SafeLogger, find_or_create_run

    manifest = check_data(cfg)  # every config and data error surfaces before Ray starts
    uri = tracking_uri(cfg)
    storage = Path(cfg.train.storage_path).resolve()
    run_dir = storage / cfg.train.run_name
    # Continue the MLflow run of the same name only where Ray still has that run's state to resume from.
    run_id, resumed = find_or_create_run(uri, cfg.mlflow.experiment, cfg.train.run_name,
                                         tags={"flowray.kind": "train", "flowray.method": cfg.method.name,
                                               "flowray.data": manifest["source"],
                                               "flowray.storage": str(run_dir)},
                                         resume=run_dir.exists())
    init_ray(cfg.ray.address, cfg.ray.local_cpus)
    mkw = model_kwargs(cfg, manifest)
    loop_cfg = {
        "config": cfg.to_dict(), "flat_config": cfg.flat(), "model_name": cfg.model.name, "model_kwargs": mkw,
        "method_kwargs": method_kwargs(cfg), "tracking_uri": uri, "run_id": run_id,
        "manifest": {k: manifest[k] for k in ("source", "kind", "shape", "num_classes", "class_names")},
        "fault_marker": str(run_dir / f".fault_injected_step_{cfg.train.fail_at_step}"),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=_resources(cfg)),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep)),
        datasets={"train": build_dataset(cfg, manifest)},
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:
        SafeLogger(uri, run_id).finish("FAILED")
        raise
    SafeLogger(uri, run_id).finish("FINISHED")
    ckpt = result.checkpoint.path if result.checkpoint else None
    return {
        "run_id": run_id, "experiment": cfg.mlflow.experiment, "tracking_uri": uri, "resumed": resumed,
        "checkpoint": ckpt, "run_dir": str(run_dir), "metrics": _plain(result.metrics or {}),
        "wall_s": round(time.perf_counter() - start, 1),
        "sample_grid": f"runs:/{run_id}/samples" if manifest["kind"] == "image" else None,
    }


def _resources(cfg: Config) -> dict:
    res = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        res["GPU"] = cfg.ray.gpus_per_worker
    return res


def _plain(d: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in d.items()
            if isinstance(v, (int, float, str, np.floating))}
