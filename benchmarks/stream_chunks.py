"""The training stream read as one Ray Data dataset for the whole run against consecutive datasets of a few pairing
tasks each (`ray.stream_chunk_tasks`, `pipelines.train.stream._records`), side by side in one run.

    python -m benchmarks.stream_chunks [--config configs/fashion-mnist-cpu.yaml] [--steps 250] [--chunks 0,8,0,8]

Each setting runs `jobs.train` on the config for its full `train.steps` (a long run, so the stream has work left
all along, as in a real run), with a progress line every 25 steps; the benchmark stops the job with SIGINT (the
job's clean stop) once it logged `--steps`, and averages images/s over the windows after step 50 (the stream's
start-up). Settings alternate, so that drift of a shared host falls on both. Prints one JSON object: images/s
per run and setting, and the ratio of each chunked setting to one dataset (0).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = re.compile(r"^step (\d+)/\d+ .* (\d+) images/s")


def run(config: str, chunk_tasks: int, steps: int, tmp: Path) -> list[float]:
    """images/s of each logged window after step 50, up to `steps`."""
    out = tmp / f"chunks-{chunk_tasks}-{time.monotonic_ns()}"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "jobs.train",
        "--config",
        config,
        "--set",
        f"ray.stream_chunk_tasks={chunk_tasks}",
        "--set",
        "train.log_every=25",
        "--set",
        f"train.storage_path={out / 'runs'}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
    ]
    rates = []
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in job.stdout:
            m = LINE.match(line.strip())
            if not m:
                continue
            step, rate = int(m.group(1)), float(m.group(2))
            if step > 50:
                rates.append(rate)
            if step >= steps:
                job.send_signal(signal.SIGINT)
                break
        job.wait(timeout=120)
    finally:
        job.kill()
    if not rates:
        raise RuntimeError(f"no progress past step 50 with ray.stream_chunk_tasks={chunk_tasks}")
    return rates


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fashion-mnist-cpu.yaml")
    p.add_argument("--steps", type=int, default=250, help="stop each job once it logged this step")
    p.add_argument("--chunks", default="0,8,0,8", help="ray.stream_chunk_tasks of each run, in order")
    a = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in (int(c) for c in a.chunks.split(",")):
            rates = run(a.config, chunk, a.steps, Path(tmp))
            runs.append({"chunk_tasks": chunk, "windows": rates, "images_per_s": round(sum(rates) / len(rates), 1)})
    by_setting = {}
    for r in runs:
        by_setting.setdefault(r["chunk_tasks"], []).append(r["images_per_s"])
    mean = {c: round(sum(v) / len(v), 1) for c, v in by_setting.items()}
    result = {
        "config": a.config,
        "steps": a.steps,
        "runs": runs,
        "images_per_s": mean,
        "ratio_to_one_dataset": {c: round(v / mean[0], 3) for c, v in mean.items() if c and 0 in mean},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
