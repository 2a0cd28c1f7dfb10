"""Ingest at scale: images/s on a folder of JPEGs of mixed sizes, peak memory at 20k and 200k rows, and the
training data path's capacity without a model.

    python -m benchmarks.ingest throughput [--images 20000] [--resolution 32]
    python -m benchmarks.ingest memory [--sizes 20000,200000]
    python -m benchmarks.ingest datapath [--seconds 30] [--windows 512,65536]

throughput: a generated folder (10 classes; JPEG, quality 90; widths and heights drawn from 24..160 px) ingested
at --resolution with --transform center-crop: (a) one process, no Ray, the same per-image work (`ingest_part` over
every part in turn), the baseline; (b) the Ray Data job with at most 1 and (c) 2 parts at once, timed from the
`ingest` call on an already started local Ray (its start-up is reported apart). The old ingest
could not resize (it quarantined every photo of another size) and held every row in one process, so (a) is the
fair single-process figure. Each runs in a fresh process.
memory: the same kind of folder at each size, with smaller photos (24..48 px: the row count is what is measured;
the larger sizes hard-link the files of the first 20k, so they are listed, read and decoded like distinct files),
ingested in a fresh process; peak RSS of the driver (ru_maxrss) and the largest peak RSS (VmHWM) of the Ray
workers that ran ingest tasks, polled from /proc while the job runs.
datapath: 32x32x3 rows through the training data path (`pipelines.train.stream`: parquet rows read by step -> flips,
noise and the cifar10 preset's coupling in Ray Data tasks -> `iter_batches`, no model): images/s per CPU of the
host, and from it the CPUs per GPU needed to feed the cifar10 preset at an assumed GPU rate (its FLOPs per image,
counted here, at an assumed 35% of a 989 TFLOP/s bf16 dense peak: no GPU was measured).
Prints one JSON object per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, unique: int = 20_000, seed: int = 0, sides: tuple[int, int] = (24, 160)) -> Path:
    """n JPEGs in 10 class folders, widths and heights drawn from `sides`; beyond `unique` files, hard links to
    the first ones."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    made = []
    for i in range(min(n, unique)):
        w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)  # smooth, photo-like
        im = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        path = root / f"c{i % 10}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90)
        made.append(path)
    for i in range(unique, n):
        src = made[i % unique]
        os.link(src, root / src.parent.name / f"{i:07d}.jpg")
    return root


def _child(mode: str, folder: str, resolution: int, parallelism: int, out: str) -> None:
    """One measurement in a fresh process."""
    start = time.perf_counter()
    if mode == "baseline":
        from pipelines.ingest.part_writer import ingest_part
        from pipelines.ingest.rows import Settings
        from pipelines.ingest.run import declared_format
        from pipelines.ingest.sources import list_source

        # the clock starts after the imports, where the Ray runs' job clock does (after imports and init_ray)
        t0 = time.perf_counter()
        listing = list_source(f"folder:{folder}", 4, 20_000)
        channels, size = declared_format(listing, 3, resolution)
        with tempfile.TemporaryDirectory() as staging:
            s = Settings(channels, size, "center-crop", 0, 0.1, False, staging, len(listing.parts))
            rows = sum(ingest_part(p, s)["rows"] for p in listing.parts)
        result = {"rows": rows, "job_s": round(time.perf_counter() - t0, 2)}
    else:
        from pipelines.core.runtime import init_ray
        from pipelines.ingest.run import ingest

        init_ray()  # started apart, so that the job's own time can be told from Ray's start-up
        ray_start = time.perf_counter() - start
        peak = _WorkerPeak()
        with tempfile.TemporaryDirectory() as target:
            t0 = time.perf_counter()
            m = ingest(
                f"folder:{folder}",
                target,
                image_size=resolution,
                channels=3,
                transform="center-crop",
                parallelism=parallelism,
            ).manifest
            job = time.perf_counter() - t0
        result = {
            "rows": m["rows_read"],
            "quarantined": m["quarantined"],
            "resized": m["resized"],
            "worker_peak_rss_mb": round(peak.stop() / 1024, 1),
            "ray_start_s": round(ray_start, 2),
            "job_s": round(job, 2),
        }
    result.update(
        wall_s=round(time.perf_counter() - start, 2),
        driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    Path(out).write_text(json.dumps(result))


class _WorkerPeak:
    """Polls /proc for the Ray workers that run ingest tasks (their command line names the task) and keeps the
    largest VmHWM (peak RSS over the process's life, kB)."""

    def __init__(self, every: float = 0.2):
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self.thread.start()

    def _run(self, every: float) -> None:
        while not self.done.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if b"ingest_batch" not in Path(f"/proc/{pid}/cmdline").read_bytes()[:300]:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]))
                except OSError:
                    continue
            self.done.wait(every)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def _measure(mode: str, folder: Path, resolution: int, parallelism: int = 0) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.ingest",
                "_child",
                mode,
                str(folder),
                str(resolution),
                str(parallelism),
                f.name,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return json.loads(Path(f.name).read_text())


def throughput(images: int, resolution: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = make_folder(Path(tmp) / "photos", images)
        made = time.perf_counter() - t0
        runs = {
            "one process (baseline)": _measure("baseline", folder, resolution),
            "Ray Data, 1 part at once": _measure("ray", folder, resolution, 1),
            "Ray Data, 2 parts at once": _measure("ray", folder, resolution, 2),
        }
    base = runs["one process (baseline)"]
    for r in runs.values():  # the job's time: the baseline's whole run, the Ray job without Ray's start-up
        r["images_per_s"] = round(r["rows"] / r.get("job_s", r["wall_s"]), 1)
        r["ratio_to_baseline"] = round(r["images_per_s"] / (base["rows"] / base["job_s"]), 3)
    return {
        "mode": "throughput",
        "images": images,
        "resolution": resolution,
        "generate_s": round(made, 1),
        "cpus": os.cpu_count(),
        "runs": runs,
    }


def memory(sizes: list[int], resolution: int) -> dict:
    runs = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = make_folder(Path(tmp) / "photos", n, sides=(24, 48))  # small files: rows, not pixels, matter
            runs[n] = _measure("ray", folder, resolution, 2)
    small, large = runs[min(sizes)], runs[max(sizes)]
    return {
        "mode": "memory",
        "resolution": resolution,
        "runs": runs,
        "driver_ratio": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),
        "worker_ratio": round(large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"], 3),
    }


def datapath(seconds: float, rows: int, windows: list[int]) -> dict:
    import torch

    from fm.models import build_model
    from pipelines.core.manifest import DataSpec, Manifest
    from pipelines.core.runtime import init_ray
    from pipelines.ingest.run import ingest
    from pipelines.train.config import load_config, model_kwargs
    from pipelines.train.stream import iter_pairs, stream_spec

    with tempfile.TemporaryDirectory() as tmp:
        images = np.random.default_rng(0).integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
        np.savez(Path(tmp) / "x.npz", images=images, labels=np.arange(rows) % 10)
        ingest(f"npz:{tmp}/x.npz", Path(tmp) / "data", test_fraction=0.0)
        cfg = load_config(
            "configs/cifar10.yaml",
            [
                f"data.shards={tmp}/data",
                "data.hflip=true",
                "ray.num_workers=1",
                "ray.use_gpu=false",
                "train.batch_size=128",
                "ray.preprocess_cpus=0.25",
            ],
        )
        init_ray()
        manifest = Manifest.load(cfg.data.shards)
        spec = stream_spec(cfg, manifest, model_kwargs(cfg, manifest.data), tasks=max(1, (os.cpu_count() or 2) - 1))
        rates = {}
        for window in windows:  # side by side: the shuffle's cost is the rate against the smallest window's
            seen, start, deadline = 0, None, None
            for _, pairs in iter_pairs(replace(spec, shuffle_window=window), 0, 0, torch.device("cpu")):
                if start is None:  # the first step carries the pipeline's start-up
                    start, deadline = time.perf_counter(), time.perf_counter() + seconds
                    continue
                seen += pairs.x_1.shape[0]
                if time.perf_counter() > deadline:
                    break
            rates[window] = seen / (time.perf_counter() - start)
        rate = rates[windows[-1]]
    # the cifar10 UNet's training FLOPs per image (forward + backward), counted on the CPU
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("unet", **model_kwargs(cfg, DataSpec("npz", "image", [32, 32, 3])))
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    flops = counter.get_total_flops() / 2
    gpu_rate = 0.35 * 989e12 / flops
    cpus = os.cpu_count()
    return {
        "mode": "datapath",
        "method": cfg.method.name,
        "rows": rows,
        "seconds": seconds,
        "host_cpus": cpus,
        "images_per_s": round(rate, 1),
        "shuffle_window": windows[-1],
        "images_per_s_by_window": {w: round(r, 1) for w, r in rates.items()},
        "ratio_to_smallest_window": round(rate / rates[windows[0]], 3),
        "images_per_s_per_cpu": round(rate / cpus, 1),
        "cifar10_train_gflop_per_image": round(flops / 1e9, 2),
        "assumed_gpu_images_per_s": round(gpu_rate),
        "cpus_per_gpu": round(gpu_rate / (rate / cpus), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _child(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5])
        return {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "memory", "datapath"])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--sizes", default="20000,200000")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--windows", default="512,65536", help="datapath: data.shuffle_window values, side by side")
    a = p.parse_args(argv)
    if a.mode == "throughput":
        out = throughput(a.images, a.resolution)
    elif a.mode == "memory":
        out = memory([int(s) for s in a.sizes.split(",")], a.resolution)
    else:
        out = datapath(a.seconds, a.rows, [int(w) for w in a.windows.split(",")])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
