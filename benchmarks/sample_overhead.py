"""Sampling overhead of the Ray Data actor stage against a single-process loop (same model, solver, blocks).

    python -m benchmarks.sample_overhead [--checkpoint DIR] [--num-samples 1024] [--solver euler --steps 50]

Without --checkpoint it uses a digits-size UNet with random weights (throughput does not depend on training for
a fixed-step solver). Baseline: `Sampler.sample_block` called in a loop in this process, writing the same shards.
Stage: `run_sampling` with 1 actor. Steady state is samples per second of actor busy time; start-up (Ray, actor
construction, model load) is the stage's wall time minus its busy time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def random_checkpoint(directory: Path) -> Path:
    from fm.ema import EMA
    from fm.models import UNet
    from pipelines.core.checkpoint import save_checkpoint

    kwargs = {
        "image_size": 8,
        "in_channels": 1,
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [4],
        "num_heads": 2,
        "num_classes": None,
        "dropout": 0.0,
    }
    torch.manual_seed(0)
    model = UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    manifest = {"source": "digits", "kind": "image", "shape": [8, 8, 1], "num_classes": 10, "class_names": []}
    return save_checkpoint(
        directory,
        step=0,
        model=model,
        ema_state=EMA(model).state_dict(),
        optimizer=None,
        model_name="unet",
        model_kwargs=kwargs,
        method_kwargs={"name": "fm_ot"},
        config={},
        extra={"manifest": manifest},
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--solver", default="euler")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    torch.set_num_threads(a.threads)
    from pipelines.batch.config import SampleConfig
    from pipelines.batch.sample import Sampler, run_sampling

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(a.checkpoint) if a.checkpoint else random_checkpoint(Path(tmp) / "ckpt")
        cfg = SampleConfig(
            num_samples=a.num_samples,
            solver=a.solver,
            steps=a.steps,
            block_size=a.block_size,
            actors=1,
            cpus_per_actor=1,
        )
        base_out = Path(tmp) / "base"
        base_out.mkdir()
        sampler = Sampler(str(ckpt), str(base_out), cfg, [1, 8, 8], "HWC")
        blocks = -(-a.num_samples // a.block_size)
        sampler.sample_block(0)  # warm-up, as the stage's first call
        start = time.perf_counter()
        for b in range(blocks):
            sampler.sample_block(b)
        base_rate = a.num_samples / (time.perf_counter() - start)
        stage = run_sampling(str(ckpt), Path(tmp) / "stage", cfg)
    out = {
        "num_samples": a.num_samples,
        "block_size": a.block_size,
        "solver": a.solver,
        "steps": a.steps,
        "threads": a.threads,
        "baseline_samples_per_s": round(base_rate, 1),
        "stage_samples_per_s_steady": round(stage.samples_per_actor_s, 1),
        "ratio": round(stage.samples_per_actor_s / base_rate, 3),
        "stage_wall_s": round(stage.wall_s, 1),
        "stage_startup_s": round(stage.wall_s - a.num_samples / stage.samples_per_actor_s, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
