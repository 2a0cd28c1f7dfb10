"""Ray Data's footer-reading pool on the project's parquet reads: sized to the files (`pipelines.core.runtime.
read_parquet`, one actor per 10 files) against Ray's own 32 actors a read, in a tiny training run that scores its
samples while it trains, as `flowray train` runs it.

    python -m benchmarks.parquet_footers [--repeats 2] [--steps 8]

Each run is a fresh `python -m jobs.train` process (so a fresh local Ray) on the digits ingested once at the start:
the suite's tiny UNet (`model_channels=8`), 2 Train workers, batch 16, `--steps` steps, a checkpoint every 4, each
scored (32 samples, dopri5, the digits classifier's FD, bits/dim on 16 test rows; the classifier and its
statistics of the train split are trained and cached by the first run, before the timed ones). The two kinds
alternate, `--repeats` times each: "ray" sets RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=32 (Ray's default, which
`read_parquet` leaves alone where it is set), "sized" leaves it unset. Per run: wall time, the CPU seconds of the
whole machine (/proc/stat, every core), and the `FooterReader` actor processes seen (polled every 50 ms). Prints one
JSON object with the medians and the ratios sized / ray.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _machine_cpu_seconds() -> float:
    """Busy CPU seconds of every core since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _footer_readers(stop: threading.Event, seen: set[int]) -> None:
    while not stop.is_set():
        for p in psutil.process_iter(["cmdline"]):
            if (p.info["cmdline"] or [""])[0].startswith("ray::FooterReader"):
                seen.add(p.pid)
        time.sleep(0.05)


def train(shards: Path, tmp: Path, name: str, steps: int, footers: str | None) -> dict:
    sets = [
        "model.model_channels=8",
        "model.num_heads=1",
        "model.attention_resolutions=[]",
        "train.batch_size=16",
        "train.checkpoint_every=4",
        "train.sample_every=0",
        "optim.warmup_steps=2",
        "mlflow.log_model=false",
        f"data.shards={shards}",
        f"train.storage_path={tmp / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"train.run_name={name}",
        f"train.steps={steps}",
        "train.eval_every=4",
        "train.eval_samples=32",
        "train.eval_rows=16",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"}
    if footers is not None:
        env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = footers
    cmd = [sys.executable, "-m", "jobs.train", "--config", "configs/digits-cpu.yaml"]
    cmd += [a for s in sets for a in ("--set", s)]
    seen: set[int] = set()
    stop = threading.Event()
    poller = threading.Thread(target=_footer_readers, args=(stop, seen), daemon=True)
    poller.start()
    cpu, t0 = _machine_cpu_seconds(), time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _machine_cpu_seconds() - cpu
    stop.set()
    poller.join()
    if done.returncode != 0:
        raise SystemExit(f"the training run failed ({done.returncode}): {done.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "footer_reader_processes": len(seen)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "digits"
        subprocess.run(
            [sys.executable, "-m", "jobs.ingest", "--source", "digits", "--out", str(shards), "--shards", "2"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        train(shards, tmp, "warm-up", 4, None)  # the evaluation's caches beside the shards, for every timed run
        runs: dict[str, list[dict]] = {"ray": [], "sized": []}
        for r in range(args.repeats):
            for kind, footers in (("ray", "32"), ("sized", None)):
                runs[kind].append(train(shards, tmp, f"{kind}-{r}", args.steps, footers))
    med = {k: {m: round(statistics.median(x[m] for x in v), 1) for m in v[0]} for k, v in runs.items()}
    print(
        json.dumps(
            {
                "runs": runs,
                "median": med,
                "sized_over_ray": {m: round(med["sized"][m] / med["ray"][m], 3) for m in ("wall_s", "cpu_s")},
                "steps": args.steps,
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
