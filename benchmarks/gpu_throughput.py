"""GPU figures for the cifar10-size UNet (needs only fm/, torch and torchdiffeq): bf16 training-step throughput as a
fraction of the GPU's measured bf16 matmul peak, sampling throughput, and the FID Inception network's images/s.
Skips cleanly without a GPU.

    python -m benchmarks.gpu_throughput [--batch 128] [--steps 20]

Prints one JSON object ({"skipped": reason} without CUDA).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def matmul_peak(dtype=torch.bfloat16, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def inception_rate(batch: int, reps: int = 10) -> dict:
    """FID feature throughput: 32x32 images through the Inception-v3 (resize to 299 included), fp32."""
    from fm.inception import inception_features, load_inception

    try:
        net = load_inception(device="cuda")
    except FileNotFoundError as err:
        return {"inception_skipped": str(err)}
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    inception_features(net, x, batch_size=batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        inception_features(net, x, batch_size=batch)
    torch.cuda.synchronize()
    return {"inception_images_per_s": batch * reps / (time.perf_counter() - start)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=50)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: GPU figures need a GPU machine"}))
        return
    from torch.utils.flop_counter import FlopCounterMode

    from fm.methods import make_method
    from fm.models import UNet
    from fm.solvers import ode_sample

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = UNet(image_size=32, in_channels=3, model_channels=256, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), dropout=0.1, num_heads=4).cuda()
    method = make_method("fm_ot")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, 3, 32, 32, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method.loss(model, x).mean()
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / a.steps
    peak = matmul_peak()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fn = method.velocity(model)
        ode_sample(fn, torch.randn(8, 3, 32, 32, device="cuda"), "euler", steps=2)
        torch.cuda.synchronize()
        start = time.perf_counter()
        res = ode_sample(fn, torch.randn(a.batch * 4, 3, 32, 32, device="cuda"), "euler", steps=a.sample_steps)
        torch.cuda.synchronize()
        sample_s = time.perf_counter() - start
    inception = inception_rate(a.batch)
    print(json.dumps({
        **inception,
        "device": torch.cuda.get_device_name(), "batch": a.batch, "params_m": sum(p.numel() for p in
                                                                                    model.parameters()) / 1e6,
        "train_images_per_s": a.batch / step_s, "train_step_tflops": flops / step_s / 1e12,
        "bf16_matmul_peak_tflops": peak / 1e12, "fraction_of_peak": flops / step_s / peak,
        "sampling_images_per_s": a.batch * 4 / sample_s, "sampling_solver": f"euler {a.sample_steps} steps",
        "sampling_nfe": res.nfe}))


if __name__ == "__main__":
    main()
