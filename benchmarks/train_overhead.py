"""Training overhead of the Ray pipeline against a plain in-process PyTorch loop (same model, batch, threads).

    python -m benchmarks.train_overhead [--steps 300] [--batch 64] [--threads 1] [--windows 3]

Baseline: `fm.training.train_step` over in-memory tensors of the same digits shards, in this process, run before
and after the pipeline (the machine's speed drifts on a shared host: the ratio is to their mean).
Pipeline: `jobs.train` machinery with 1 Ray Train worker (the training stream from parquet, DDP wrapper,
checkpoints, MLflow logging), logging `--windows` windows of equal steps. Steady-state images/s of the pipeline is
the aggregate rate of every window but the first (which holds the warm-up), read from the run's MLflow history;
the spread of those windows is reported beside it. Start-up is the wall time not explained by the steps at that
rate. Prints one JSON object.

Where the time goes (`cpu`): every process's CPU time, sampled each second with psutil, over the pipeline's steady
windows (from its first logged window to its last, by their MLflow timestamps): the Train worker's CPU seconds per
step (and per thread) beside the baseline's, and how many cores every other process (the stream's tasks, Ray's
daemons, the driver) kept busy meanwhile. A worker that spends the baseline's CPU per step but takes longer in wall
time was waiting for a core; one that spends more did more work per step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
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
            start, cpu = time.perf_counter(), time.process_time()
        idx = torch.randint(0, x.shape[0], (b,), generator=g)
        train_step(model, method, opt, x[idx], None, g, cfg.optim.grad_clip)
        ema.update(model)
    return {
        "images_per_s": steps * b / (time.perf_counter() - start),
        "cpu_ms_per_step": 1000 * (time.process_time() - cpu) / steps,
    }


class CpuSampler:
    """Each process's CPU seconds (user + system, and per thread), sampled every `every` seconds in a thread."""

    def __init__(self, every: float = 1.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            snap = {}
            for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
                try:
                    t = proc.info["cpu_times"]
                    threads = {th.id: th.user_time + th.system_time for th in proc.threads()}
                except (psutil.Error, TypeError):
                    continue
                name = _label(proc.info["cmdline"] or [proc.info["name"] or "?"])
                snap[proc.info["pid"]] = (name, t.user + t.system, threads)
            self.samples.append((time.time(), snap))
            self._stop.wait(self.every)

    def between(self, t0: float, t1: float) -> tuple[float, dict]:
        """(seconds, {pid: (name, cpu seconds, {thread id: cpu seconds})}) between the samples nearest t0 and t1."""
        (a_t, a), (b_t, b) = (min(self.samples, key=lambda s: abs(s[0] - t)) for t in (t0, t1))
        out = {}
        for pid, (name, cpu, threads) in b.items():
            name0, cpu0, threads0 = a.get(pid, (name, 0.0, {}))
            out[pid] = (name, cpu - cpu0, {i: v - threads0.get(i, 0.0) for i, v in threads.items()})
        return b_t - a_t, out


def _label(cmdline: list[str]) -> str:
    """A process's short name: `ray::Name` as Ray titles its workers, else the program (and a python's script)."""
    head = Path(cmdline[0]).name
    if head.startswith("python") and len(cmdline) > 1:
        script = next((a for a in cmdline[1:] if not a.startswith("-")), "")
        return f"python {Path(script).name}"[:40]
    return head.split(" ")[0][:40]


def cpu_account(sampler: CpuSampler, history: list, log_every: int) -> dict:
    """The steady windows' CPU: the Train worker's per step (and its busiest threads'), the rest's in cores."""
    seconds, procs = sampler.between(history[0].timestamp / 1000, history[-1].timestamp / 1000)
    steps = (history[-1].step - history[0].step) or log_every
    me = os.getpid()
    worker = max((p for p in procs.items() if "RayTrainWorker" in p[1][0]), key=lambda p: p[1][1], default=None)
    others = defaultdict(float)
    for pid, (name, cpu, _) in procs.items():
        if worker is None or pid != worker[0]:
            key = "this driver" if pid == me else name
            others[key] += cpu
    top = sorted(others.items(), key=lambda kv: -kv[1])[:8]
    out = {
        "seconds": round(seconds, 1),
        "steps": steps,
        "others_cores": round(sum(others.values()) / seconds, 3),
        "others_top_cores": {k: round(v / seconds, 3) for k, v in top},
    }
    if worker is not None:
        _, (name, cpu, threads) = worker
        out["worker_cpu_ms_per_step"] = round(1000 * cpu / steps, 2)
        out["worker_cores"] = round(cpu / seconds, 3)
        out["worker_threads_ms_per_step"] = sorted(
            (round(1000 * v / steps, 2) for v in threads.values()), reverse=True
        )[:4]
    return out


def pipeline(cfg) -> dict:
    from mlflow.tracking import MlflowClient

    from pipelines.train.driver import run_training

    start = time.perf_counter()
    with CpuSampler() as sampler:
        res = run_training(cfg)
    wall = time.perf_counter() - start
    history = sorted(
        MlflowClient(res.tracking_uri).get_metric_history(res.run_id, "images_per_s"), key=lambda m: m.step
    )
    windows = [m.value for m in history[1:]] or [history[-1].value]
    rate = len(windows) / sum(1 / r for r in windows)  # equal steps per window: the harmonic mean is the aggregate
    steps_time = cfg.train.steps * cfg.train.batch_size / rate
    return {
        "images_per_s": rate,
        "windows": [round(r, 1) for r in windows],
        "data_wait_fraction": res.metrics["data_wait_fraction"],
        "wall_s": wall,
        "startup_s": wall - steps_time,
        "cpu": cpu_account(sampler, history, cfg.train.log_every),
    }


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
        cfg = load_config(
            "configs/digits-cpu.yaml",
            [
                f"data.shards={shards}",
                f"train.storage_path={tmp}/runs",
                f"mlflow.tracking_uri=sqlite:///{tmp}/m.db",
                f"train.steps={a.steps}",
                f"train.batch_size={a.batch}",
                "ray.num_workers=1",
                "ray.cpus_per_worker=1",
                f"train.log_every={a.steps // a.windows}",
                f"train.checkpoint_every={a.steps}",
                "train.sample_every=0",
                "train.run_name=bench",
            ],
        )
        first = baseline(shards, cfg, a.steps, a.threads)
        pipe = pipeline(cfg)
        time.sleep(10)  # Ray's processes exit after ray.shutdown returns: the second baseline runs on a quiet machine
        last = baseline(shards, cfg, a.steps, a.threads)
    before, after = first["images_per_s"], last["images_per_s"]
    base = (before + after) / 2
    out = {
        "steps": a.steps,
        "batch": a.batch,
        "threads": a.threads,
        "model": "digits-cpu UNet",
        "baseline_images_per_s": round(base, 1),
        "baseline_before_after": [round(before, 1), round(after, 1)],
        "pipeline_images_per_s": round(pipe["images_per_s"], 1),
        "pipeline_windows": pipe["windows"],
        "ratio": round(pipe["images_per_s"] / base, 3),
        "pipeline_data_wait_fraction": round(pipe["data_wait_fraction"], 4),
        "pipeline_startup_s": round(pipe["startup_s"], 1),
        "pipeline_wall_s": round(pipe["wall_s"], 1),
        "baseline_cpu_ms_per_step": round((first["cpu_ms_per_step"] + last["cpu_ms_per_step"]) / 2, 2),
        "baseline_wall_ms_per_step": round(1000 * a.batch / base, 2),
        "pipeline_wall_ms_per_step": round(1000 * a.batch / pipe["images_per_s"], 2),
        "pipeline_cpu": pipe["cpu"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
