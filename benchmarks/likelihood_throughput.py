"""Likelihood throughput at the demo size: images/s for the exact divergence and for Hutchinson (1 probe).

    python -m benchmarks.likelihood_throughput [--batch 64] [--threads 2]

The digits-cpu UNet (random weights; dopri5's step count then reflects that field, so a fixed rk4 grid of 20
steps is used to compare the divergence cost alone). Prints one JSON object with images/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fm.likelihood import LikelihoodSettings, bits_per_dim
    from fm.models import UNet

    torch.manual_seed(0)
    model = UNet(
        image_size=8,
        in_channels=1,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
    ).eval()
    for p_ in model.parameters():
        torch.nn.init.normal_(p_, std=0.02)
    x = torch.randint(0, 256, (a.batch, 1, 8, 8)).float()
    out = {"batch": a.batch, "threads": a.threads, "solver": f"rk4, {a.steps} steps", "draws": 1}
    for name, div in (("exact", "exact"), ("hutchinson_1_probe", "hutchinson")):
        bits_per_dim(model, x[:4], settings=LikelihoodSettings(div, solver="rk4", steps=2))  # warm-up
        start = time.perf_counter()
        res = bits_per_dim(
            model,
            x,
            generator=torch.Generator().manual_seed(0),
            settings=LikelihoodSettings(div, solver="rk4", steps=a.steps),
        )
        out[f"{name}_images_per_s"] = round(a.batch / (time.perf_counter() - start), 2)
        out[f"{name}_nfe"] = res.nfe
    out["hutchinson_over_exact"] = round(out["hutchinson_1_probe_images_per_s"] / out["exact_images_per_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
