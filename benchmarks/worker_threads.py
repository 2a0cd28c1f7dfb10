"""Why every Ray worker and actor sets its torch threads to the CPUs it reserved
(`pipelines.core.runtime.use_cpu_share`).

    python -m benchmarks.worker_threads [--procs 2] [--steps 8] [--config configs/fashion-mnist-cpu.yaml] [--ddp]

`--procs` processes train the config's UNet at once (random batches of its data shape, AdamW), as that many
Ray Train workers on one node do: first with torch's default thread count (every core, what a Ray Train worker got
before), then with one thread each (what 0.5 or 1 reserved CPU gives). With `--ddp`, a third setting: one thread each
and the model wrapped in DistributedDataParallel over a gloo process group of the processes (what Ray Train's
`prepare_model` does), without Ray: the cost of gradient all-reduce in lockstep alone. Prints one JSON object:
images/s per process in each setting and their ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def _train(args: tuple) -> float:
    config, threads, steps, batch, rank, world, port = args
    import torch

    from fm.models import build_model
    from pipelines.train.config import load_config

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(config)
    m = cfg.model
    model = build_model(
        m.name,
        image_size=28,
        in_channels=1,
        model_channels=m.model_channels,
        channel_mult=list(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=list(m.attention_resolutions),
        num_heads=m.num_heads,
        num_classes=None,
        dropout=m.dropout,
    )
    if port:  # DDP over gloo among the pool's processes, as Ray Train's prepare_model wraps a CPU model
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = torch.randn(batch, 1, 28, 28), torch.rand(batch)
    for step in range(steps + 2):
        if step == 2:  # the first steps allocate
            start = time.perf_counter()
        loss = (model(x, t) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rate = steps * batch / (time.perf_counter() - start)
    if port:
        torch.distributed.destroy_process_group()
    return rate


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--config", default="configs/fashion-mnist-cpu.yaml")
    p.add_argument("--ddp", action="store_true", help="also one thread each under DDP (gloo), without Ray")
    a = p.parse_args()
    import torch

    out = {
        "procs": a.procs,
        "batch": a.batch,
        "steps": a.steps,
        "config": a.config,
        "default_threads": torch.get_num_threads(),
    }
    ctx = mp.get_context("spawn")
    settings = [("default", 0, 0), ("one_thread", 1, 0)] + ([("one_thread_ddp", 1, _free_port())] if a.ddp else [])
    for label, threads, port in settings:
        with ctx.Pool(a.procs) as pool:
            rates = pool.map(_train, [(a.config, threads, a.steps, a.batch, r, a.procs, port) for r in range(a.procs)])
        out[f"{label}_images_per_s_per_proc"] = round(sum(rates) / len(rates), 1)
    out["ratio_one_thread_to_default"] = round(
        out["one_thread_images_per_s_per_proc"] / out["default_images_per_s_per_proc"], 2
    )
    if a.ddp:
        out["ratio_ddp_to_one_thread"] = round(
            out["one_thread_ddp_images_per_s_per_proc"] / out["one_thread_images_per_s_per_proc"], 3
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
