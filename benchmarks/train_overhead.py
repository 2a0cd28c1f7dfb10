"""Training overhead of the Ray pipeline against a plain in-process PyTorch loop (same model, batch, threads).

    python -m benchmarks.train_overhead [--steps 300] [--batch 64] [--threads 1] [--windows 3]

Baseline: `fm.training.train_step` over in-memory tensors of the same digits shards, in this process, run before
and after the pipeline (the machine's speed drifts on a shared host: the ratio is to their mean).
Pipeline: `jobs.train` machinery with 1 Ray Train worker (the training stream from parquet, DDP wrapper,
checkpoints, MLflow logging), logging `--windows` windows of equal steps. Steady-state images/s of the pipeline is
the aggregate rate of every window but the first (which holds the warm-up), read from the run's MLflow history;
the spread of those windows is reported beside it. Start-up is the wall time not explained by the steps at that
rate. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch


def baseline(shards: Path, cfg, steps: int, threads: int) -> dict:
    from fm.data import to_model_space
    from fm.ema import EMA
    from fm.methods import make_method
    from fm.models import build_model
    from fm.training import train_step
    from pipelines.core.cells import decode_rows
    from pipelines.ingest.run import load_manifest, shard_paths
    from pipelines.train.config import method_kwargs, model_kwargs

    torch.set_num_threads(threads)
    manifest = load_manifest(shards)
    raw = [b for p in shard_paths(shards, "train") for b in pq.read_table(p)["image"].to_pylist()]
    x = to_model_space(decode_rows(raw, manifest.data.shape))
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **model_kwargs(cfg, manifest.data))
    method = make_method(**method_kwargs(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    ema = EMA(model, cfg.optim.ema_decay)
    g = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    warm = 20
    for step in range(steps + warm):
        if step == warm:
            start = time.perf_counter()
        idx = torch.randint(0, x.shape[0], (b,), generator=g)
        train_step(model, method, opt, x[idx], None, g, cfg.optim.grad_clip)
        ema.update(model)
    return {"images_per_s": steps * b / (time.perf_counter() - start)}


def pipeline(cfg) -> dict:
    from mlflow.tracking import MlflowClient

    from pipelines.train.driver import run_training

    start = time.perf_counter()
    res = run_training(cfg)
    wall = time.perf_counter() - start
    history = sorted(MlflowClient(res["tracking_uri"]).get_metric_history(res["run_id"], "images_per_s"),
                     key=lambda m: m.step)
    windows = [m.value for m in history[1:]] or [history[-1].value]
    rate = len(windows) / sum(1 / r for r in windows)  # equal steps per window: the harmonic mean is the aggregate
    steps_time = cfg.train.steps * cfg.train.batch_size / rate
    return {"images_per_s": rate, "windows": [round(r, 1) for r in windows],
            "data_wait_fraction": res["metrics"]["data_wait_fraction"], "wall_s": wall,
            "startup_s": wall - steps_time}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, default=3, help="logging windows of the pipeline run")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))  # Ray workers get the same thread count
    from pipelines.ingest.run import ingest
    from pipelines.train.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "digits"
        ingest("digits", shards, shards=4)
        cfg = load_config("configs/digits-cpu.yaml", [
            f"data.shards={shards}", f"train.storage_path={tmp}/runs", f"mlflow.tracking_uri=sqlite:///{tmp}/m.db",
            f"train.steps={a.steps}", f"train.batch_size={a.batch}", "ray.num_workers=1", "ray.cpus_per_worker=1",
            f"train.log_every={a.steps // a.windows}", f"train.checkpoint_every={a.steps}", "train.sample_every=0",
            "train.run_name=bench"])
        before = baseline(shards, cfg, a.steps, a.threads)["images_per_s"]
        pipe = pipeline(cfg)
        after = baseline(shards, cfg, a.steps, a.threads)["images_per_s"]
    base = (before + after) / 2
    out = {"steps": a.steps, "batch": a.batch, "threads": a.threads, "model": "digits-cpu UNet",
           "baseline_images_per_s": round(base, 1),
           "baseline_before_after": [round(before, 1), round(after, 1)],
           "pipeline_images_per_s": round(pipe["images_per_s"], 1), "pipeline_windows": pipe["windows"],
           "ratio": round(pipe["images_per_s"] / base, 3),
           "pipeline_data_wait_fraction": round(pipe["data_wait_fraction"], 4),
           "pipeline_startup_s": round(pipe["startup_s"], 1), "pipeline_wall_s": round(pipe["wall_s"], 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
