"""GPU figures for the cifar10-size UNet (needs only fm/, torch and torchdiffeq): bf16 training-step throughput as a
fraction of the GPU's measured bf16 matmul peak, sampling throughput, and the FID Inception network's images/s.
Skips cleanly without a GPU.

    python -m benchmarks.gpu_throughput [--batch 128] [--steps 20]

Step variants, side by side (`step_variants`): the bf16 I-CFM step eager, channels-last and under `torch.compile`
(the fastest is kept); then with it OT-CFM with the exact OT solve in the step, and OT-CFM fed by pairs made
ahead on the CPU (`fm.training.pair_step` in a reader thread, what the training stream's CPU stage hands a
worker), each as a ratio to I-CFM.

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
    return 2 * n**3 / _time_steps(lambda _: a @ b, lambda k: None, reps, torch.device("cuda"))


def cifar_unet():
    """The cifar10 preset's UNet (`configs/cifar10.yaml`), on the CPU."""
    from fm.models import UNet

    return UNet(
        image_size=32,
        in_channels=3,
        model_channels=256,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        num_heads=4,
    )


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


def _time_steps(step, batch_at, steps: int, device: torch.device) -> float:
    """Mean seconds per step over `steps` steps after 3 warm-up steps; step(batch_at(k)) for k = 0, 1, ..."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k in range(3):
        step(batch_at(k))
    sync()
    start = time.perf_counter()
    for k in range(steps):
        step(batch_at(3 + k))
    sync()
    return (time.perf_counter() - start) / steps


def step_variants(
    model_fn, shape: tuple[int, ...], batch: int, steps: int, device: torch.device, compile_model: bool = True
) -> dict:
    """Seconds per training step of a fresh model from `model_fn()` on data [batch, *shape]: I-CFM eager,
    channels-last and compiled (the fastest layout kept), then OT-CFM solving in the step and OT-CFM on pairs made
    ahead on the CPU, with their ratios to I-CFM."""
    from fm.methods import make_method
    from fm.seeding import generator
    from fm.training import pair_step, read_ahead, train_step

    autocast = torch.bfloat16 if device.type == "cuda" else None
    data = [torch.randn(batch, *shape, generator=generator(0, k)) for k in range(4)]

    def build(layout: str):
        model = model_fn().to(device)
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return (torch.compile(model) if layout == "compile" else model), opt

    def in_step(method_name: str, layout: str) -> float:
        model, opt = build(layout)
        method = make_method(method_name)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xs = [x.to(device).contiguous(memory_format=fmt) for x in data]
        return _time_steps(
            lambda x: train_step(model, method, opt, x, generator=generator(1, device=device), autocast_dtype=autocast),
            lambda k: xs[k % 4],
            steps,
            device,
        )

    out = {"icfm_eager_s": in_step("icfm", "eager"), "icfm_channels_last_s": in_step("icfm", "channels_last")}
    if compile_model:
        out["icfm_compile_s"] = in_step("icfm", "compile")
    layout = min((k for k in out), key=out.get).removeprefix("icfm_").removesuffix("_s")
    out["layout"] = layout
    out["otcfm_in_step_s"] = in_step("otcfm", layout)
    # pairs made ahead on the CPU, moved to the device: the training stream's CPU stage, in one process here
    model, opt = build(layout)
    method = make_method("otcfm")
    pairs = read_ahead(
        iter(range(steps + 3)), lambda k: _on(pair_step(method, data[k % 4], None, generator(2, k)), device), buffer=8
    )
    out["otcfm_ahead_s"] = _time_steps(
        lambda p: train_step(model, method, opt, p.x_1, pairs=p, autocast_dtype=autocast),
        lambda k: next(pairs),
        steps,
        device,
    )
    best = out[f"icfm_{layout}_s"]
    out["otcfm_in_step_ratio"] = out["otcfm_in_step_s"] / best
    out["otcfm_ahead_ratio"] = out["otcfm_ahead_s"] / best
    return out


def _on(pairs, device: torch.device):
    """Pairs moved to `device` (their generator stays on the CPU, as the stream hands it over)."""
    from fm.training import Pairs

    return Pairs(
        pairs.x_0.to(device, non_blocking=True),
        pairs.x_1.to(device, non_blocking=True),
        pairs.y,
        pairs.generator,
        pairs.solve_seconds,
    )


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
    from fm.solvers import ode_sample

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = cifar_unet().cuda()
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
    step_s = _time_steps(lambda _: step(), lambda k: None, a.steps, torch.device("cuda"))
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
    variants = step_variants(cifar_unet, (3, 32, 32), a.batch, a.steps, torch.device("cuda"))
    print(
        json.dumps(
            {
                **inception,
                "step_variants": variants,
                "device": torch.cuda.get_device_name(),
                "batch": a.batch,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "train_images_per_s": a.batch / step_s,
                "train_step_tflops": flops / step_s / 1e12,
                "bf16_matmul_peak_tflops": peak / 1e12,
                "fraction_of_peak": flops / step_s / peak,
                "sampling_images_per_s": a.batch * 4 / sample_s,
                "sampling_solver": f"euler {a.sample_steps} steps",
                "sampling_nfe": res.nfe,
            }
        )
    )


if __name__ == "__main__":
    main()
