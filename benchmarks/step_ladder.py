"""Where a Ray Train worker's step costs more than a plain loop's: a ladder of rungs, each adding one thing, measured as
CPU milliseconds of the main thread per step (`time.thread_time`), in alternating windows so that host drift cancels.

    python -m benchmarks.step_ladder [--steps 100] [--rounds 4] [--batch 64]

The same digits-cpu UNet, method, batch and optimizer everywhere, on in-memory rows of the digits, one thread:

    0 loop           `fm.training.train_step` + EMA in this process (the baseline of `benchmarks.train_overhead`)
    1 ray task       the same loop in a Ray actor (a Ray worker process: its threads, allocator and environment)
    2 train worker   the same loop in a Ray Train worker (TorchTrainer, 1 worker), without DDP
    3 + ddp          the model wrapped in DistributedDataParallel at world size 1 (gloo), as a multi-worker run has it
    4 + step         the pipeline's step (`pipelines.train.worker.TrainWorker`'s bookkeeping: learning rate, dropout
                     seed, pairs made ahead by `pair_step`, the non-finite count, EMA, metric window and timers)

Rungs 0 and 1 alternate window by window (A/B/A/B), as do rungs 2, 3 and 4 inside one Train worker; every rung runs
`--rounds` windows of `--steps` steps after a warm-up window. The full pipeline (the stream's read-ahead, MLflow
logging, checkpoints) is `benchmarks.train_overhead`, which reports the Train worker's main-thread CPU per step
measured from outside. Prints one JSON object: per rung, the median over its windows of CPU ms and wall ms per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RUNGS = ("loop", "ray task", "train worker", "+ ddp", "+ step")
CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "digits-cpu.yaml")


class Loop:
    """One rung's training state on in-memory rows; `window(n)` runs n steps and returns (CPU ms, wall ms) per step
    of the calling thread."""

    def __init__(self, shards: str, overrides: list[str], variant: str = "plain"):
        import torch

        from fm.data import to_model_space
        from fm.ema import EMA
        from fm.methods import make_method
        from fm.models import build_model
        from pipelines.core.cells import decode_rows
        from pipelines.core.manifest import Manifest
        from pipelines.train.config import load_config, method_kwargs, model_kwargs

        torch.set_num_threads(1)
        self.cfg = load_config(CONFIG, [f"data.shards={shards}", *overrides])
        manifest = Manifest.load(shards)
        import pyarrow.parquet as pq

        raw = [b for p in manifest.shard_paths("train") for b in pq.read_table(p)["image"].to_pylist()]
        self.x = to_model_space(decode_rows(raw, manifest.data.shape))
        torch.manual_seed(0)
        self.model = build_model(self.cfg.model.name, **model_kwargs(self.cfg, manifest.data))
        self.method = make_method(**method_kwargs(self.cfg))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.optim.lr)
        self.ema = EMA(self.model, self.cfg.optim.ema_decay)
        self.g = torch.Generator().manual_seed(0)
        self.variant, self.step_no = variant, 0
        self.net = self.model
        if variant == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model)

    def _batch(self):
        import torch

        idx = torch.randint(0, self.x.shape[0], (self.cfg.train.batch_size,), generator=self.g)
        return self.x[idx]

    def _plain_step(self) -> None:
        from fm.training import train_step

        train_step(self.net, self.method, self.opt, self._batch(), None, self.g, self.cfg.optim.grad_clip)
        self.ema.update(self.model)

    def _pipeline_step(self) -> None:
        """What `TrainWorker.run` and `TrainWorker.step` do around `train_step`, on an in-memory batch."""
        from fm.seeding import derive_seed, seed_default_generator
        from fm.training import lr_at, pair_step, train_step
        from pipelines.train.stream import DROPOUT_STREAM
        from pipelines.train.worker import MetricWindow, StepTimers

        if not hasattr(self, "metric_window"):
            self.metric_window, self.timers, self.nonfinite = MetricWindow(), StepTimers(0), 0
        o, t = self.cfg.optim, self.cfg.train
        t_start = time.perf_counter()
        pairs = pair_step(self.method, self._batch(), None, self.g)  # the stream's work, here in the step
        t_data = time.perf_counter() - t_start
        for group in self.opt.param_groups:
            group["lr"] = lr_at(
                self.step_no, o.lr, o.warmup_steps, o.schedule, o.decay_steps or t.steps, o.min_lr, o.power
            )
        seed_default_generator(derive_seed(t.seed, 0, self.step_no, DROPOUT_STREAM))
        res = train_step(self.net, self.method, self.opt, pairs.x_1, grad_clip=o.grad_clip, pairs=pairs)
        self.nonfinite = 0 if res.finite else self.nonfinite + 1
        if res.finite:
            self.ema.update(self.model)
        t_total = time.perf_counter() - t_start
        self.metric_window.add(res, t_data, t_total, pairs.solve_seconds)
        self.timers.add(self.step_no + 1, t_data, t_total)
        if (self.step_no + 1) % t.log_every == 0:
            self.metric_window.metrics(t.batch_size, self.opt.param_groups[0]["lr"], self.nonfinite)
            self.metric_window = MetricWindow()

    def window(self, n: int) -> tuple[float, float]:
        step = self._pipeline_step if self.variant == "step" else self._plain_step
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(n):
            step()
            self.step_no += 1
        return 1000 * (time.thread_time() - cpu) / n, 1000 * (time.perf_counter() - wall) / n


def _train_worker_rungs(config: dict) -> None:
    """In one Ray Train worker: rungs 2, 3 and 4 in rotation; the windows go back in a file (this benchmark runs on
    one machine; Ray Train keeps a report's metrics only with a checkpoint)."""
    from pipelines.core.runtime import use_cpu_share

    use_cpu_share(1)
    loops = {
        "train worker": Loop(config["shards"], config["overrides"]),
        "+ ddp": Loop(config["shards"], config["overrides"], "ddp"),
        "+ step": Loop(config["shards"], config["overrides"], "step"),
    }
    for loop in loops.values():
        loop.window(config["steps"])  # warm-up
    out: dict[str, list] = {k: [] for k in loops}
    for _ in range(config["rounds"]):
        for name, loop in loops.items():
            out[name].append(loop.window(config["steps"]))
    Path(config["out"]).write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100, help="steps per window")
    p.add_argument("--rounds", type=int, default=4, help="windows per rung, after a warm-up window")
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.core.runtime import init_ray
    from pipelines.ingest.run import ingest

    with tempfile.TemporaryDirectory() as tmp:
        shards = str(Path(tmp) / "digits")
        ingest("digits", shards, shards=4)
        overrides = [f"train.batch_size={a.batch}", "train.log_every=50", "train.steps=100000"]
        windows: dict[str, list] = {k: [] for k in RUNGS}

        # rungs 0 and 1: this process and a Ray actor, window by window
        init_ray()
        here = Loop(shards, overrides)
        actor = ray.remote(num_cpus=1)(Loop).remote(shards, overrides)
        here.window(a.steps)
        ray.get(actor.window.remote(a.steps))
        for _ in range(a.rounds):
            windows["loop"].append(here.window(a.steps))
            windows["ray task"].append(ray.get(actor.window.remote(a.steps)))
        ray.kill(actor)

        # rungs 2 to 4: one Ray Train worker, rotating
        trainer = TorchTrainer(
            _train_worker_rungs,
            train_loop_config={
                "shards": shards,
                "overrides": overrides,
                "steps": a.steps,
                "rounds": a.rounds,
                "out": str(Path(tmp) / "train_worker.json"),
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(Path(tmp) / "runs"), name="ladder"),
        )
        trainer.fit()
        windows.update(json.loads((Path(tmp) / "train_worker.json").read_text()))

    base = statistics.median(c for c, _ in windows["loop"])
    out = {"steps_per_window": a.steps, "rounds": a.rounds, "batch": a.batch, "model": "digits-cpu UNet", "rungs": {}}
    for name in RUNGS:
        cpu = statistics.median(c for c, _ in windows[name])
        wall = statistics.median(w for _, w in windows[name])
        out["rungs"][name] = {
            "cpu_ms_per_step": round(cpu, 2),
            "wall_ms_per_step": round(wall, 2),
            "cpu_vs_loop": round(cpu / base, 3),
            "cpu_windows": [round(c, 1) for c, _ in windows[name]],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
