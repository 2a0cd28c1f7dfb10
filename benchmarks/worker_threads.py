"""Why every Ray worker and actor sets its torch threads to the CPUs it reserved (`pipelines.runtime.use_cpu_share`).

    python -m benchmarks.worker_threads [--procs 2] [--steps 8] [--config configs/fashion-mnist-cpu.yaml]

`--procs` processes train the config's UNet at once (random batches of its data shape, AdamW), as that many
Ray Train workers on one node do: first with torch's default thread count (every core, what a Ray Train worker got
before), then with one thread each (what 0.5 or 1 reserved CPU gives). Prints one JSON object: images/s per process
in each setting and their ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def _train(args: tuple) -> float:
    config, threads, steps, batch = args
    import torch

    from fm.models import build_model
    from pipelines.config import load_config

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(config)
    m = cfg.model
    model = build_model(m.name, image_size=28, in_channels=1, model_channels=m.model_channels,
                        channel_mult=list(m.channel_mult), num_res_blocks=m.num_res_blocks,
                        attention_resolutions=list(m.attention_resolutions), num_heads=m.num_heads, num_classes=None,
                        dropout=m.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = torch.randn(batch, 1, 28, 28), torch.rand(batch)
    for step in range(steps + 2):
        if step == 2:  # the first steps allocate
            start = time.perf_counter()
        loss = (model(x, t) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--config", default="configs/fashion-mnist-cpu.yaml")
    a = p.parse_args()
    import torch

    out = {"procs": a.procs, "batch": a.batch, "steps": a.steps, "config": a.config,
           "default_threads": torch.get_num_threads()}
    ctx = mp.get_context("spawn")
    for label, threads in (("default", 0), ("one_thread", 1)):
        with ctx.Pool(a.procs) as pool:
            rates = pool.map(_train, [(a.config, threads, a.steps, a.batch)] * a.procs)
        out[f"{label}_images_per_s_per_proc"] = round(sum(rates) / len(rates), 1)
    out["ratio_one_thread_to_default"] = round(out["one_thread_images_per_s_per_proc"]
                                               / out["default_images_per_s_per_proc"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
