"""Achieved FLOP/s of the digits training step (counted with torch.utils.flop_counter) as a fraction of this
machine's measured dense float32 matmul rate, and a torch.profiler breakdown of the step.

    python -m benchmarks.train_flops [--batch 64] [--threads 2] [--steps 30]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def matmul_rate(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from fm.ema import EMA
    from fm.methods import make_method
    from fm.models import UNet
    from fm.training import train_step

    torch.manual_seed(0)
    model = UNet(
        image_size=8,
        in_channels=1,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        dropout=0.0,
    )
    method = make_method("fm_ot")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(model, 0.995)
    x = torch.rand(a.batch, 1, 8, 8) * 2 - 1

    def step():
        train_step(model, method, opt, x)
        ema.update(model)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    step_s = (time.perf_counter() - start) / a.steps
    rate = matmul_rate()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    top = [
        {"op": e.key, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 5 / 1000, 3)}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    ]
    print(
        json.dumps(
            {
                "batch": a.batch,
                "threads": a.threads,
                "flops_per_step": flops,
                "step_ms": round(step_s * 1000, 2),
                "achieved_gflops": round(flops / step_s / 1e9, 2),
                "fp32_matmul_gflops": round(rate / 1e9, 2),
                "fraction_of_matmul_rate": round(flops / step_s / rate, 3),
                "top_ops": top,
            }
        )
    )


if __name__ == "__main__":
    main()
