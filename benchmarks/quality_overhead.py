"""What scoring sample quality while training (`train.eval_every`) costs the trainers: training throughput with the
scoring on against the same run with it off, side by side in one process; scoring at the trainers' OS priority
(`train.eval_nice=0`) and at the lowest (19, the default).

    python -m benchmarks.quality_overhead [--steps 400] [--eval-every 100] [--eval-samples 200] [--eval-rows 64]
        [--nice 0,19]

Both runs: the digits-cpu UNet, 1 Ray Train worker (1 CPU, 1 thread), batch 64, a checkpoint every `--eval-every`
steps, a logging window every 50. With scoring on, each checkpoint is sampled (dopri5) and evaluated (the digits
classifier's FD with its floor, bits/dim on `--eval-rows` test rows) in a Ray task beside the worker. Throughput is
the mean images/s of the logging windows after the first; the ratio is on / off. Runs one after another drift on a
shared host, so each run also compares its own windows after the first scored checkpoint (while a score runs) with
those before it: `nice<k>_vs_off` is that within-run ratio of a scoring run over the same ratio of the run without
scoring. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def run(shards: Path, tmp: str, name: str, steps: int, every: int, sets: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    from pipelines.chain import quality_callbacks
    from pipelines.train.against_data import check_data
    from pipelines.train.config import load_config
    from pipelines.train.driver import run_training

    uri = f"sqlite:///{tmp}/m.db"
    cfg = load_config(
        "configs/digits-cpu.yaml",
        [
            f"data.shards={shards}",
            f"train.storage_path={tmp}/runs",
            f"mlflow.tracking_uri={uri}",
            f"train.steps={steps}",
            "ray.num_workers=1",
            "ray.cpus_per_worker=1",
            "train.log_every=50",
            f"train.checkpoint_every={every}",
            "train.sample_every=0",
            f"train.run_name={name}",
            "mlflow.system_metrics=false",
            *sets,
        ],
    )
    manifest = check_data(cfg)
    res = run_training(cfg, manifest, callbacks=quality_callbacks(cfg, manifest))
    windows = sorted(MlflowClient(uri).get_metric_history(res.run_id, "images_per_s"), key=lambda m: m.step)[1:]
    rates = [m.value for m in windows]
    # within the run: the windows before the first scored checkpoint against those after it, while a score runs
    before = [m.value for m in windows if m.step <= every]
    during = [m.value for m in windows if m.step > every]
    fd = MlflowClient(uri).get_metric_history(res.run_id, "eval/fd")
    return {
        "images_per_s": sum(rates) / len(rates),
        "during_over_before": (sum(during) / len(during)) / (sum(before) / len(before)),
        "windows": len(rates),
        "wall_s": res.wall_s,
        "scored_steps": sorted(m.step for m in fd),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--nice", default="0,19", help="train.eval_nice of each scoring run")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pipelines.ingest.run import ingest

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "digits"
        ingest("digits", shards, shards=4)
        off = run(shards, tmp, "off", a.steps, a.eval_every, [])
        scoring = [
            f"train.eval_every={a.eval_every}",
            f"train.eval_samples={a.eval_samples}",
            f"train.eval_rows={a.eval_rows}",
        ]
        on = {
            int(n): run(shards, tmp, f"on-nice{n}", a.steps, a.eval_every, [*scoring, f"train.eval_nice={n}"])
            for n in a.nice.split(",")
        }
    out = {
        "steps": a.steps,
        "eval_every": a.eval_every,
        "eval_samples": a.eval_samples,
        "eval_rows": a.eval_rows,
        "cpus": os.cpu_count(),
        "off_images_per_s": round(off["images_per_s"], 1),
        "off_wall_s": off["wall_s"],
        "off_during_over_before": round(off["during_over_before"], 3),
    }
    for n, r in on.items():
        out[f"nice{n}_images_per_s"] = round(r["images_per_s"], 1)
        out[f"nice{n}_ratio"] = round(r["images_per_s"] / off["images_per_s"], 3)
        out[f"nice{n}_wall_s"] = r["wall_s"]
        out[f"nice{n}_scored_steps"] = r["scored_steps"]
        # the trainers' loss while a score runs, against the same windows of the run without scoring
        out[f"nice{n}_during_over_before"] = round(r["during_over_before"], 3)
        out[f"nice{n}_vs_off"] = round(r["during_over_before"] / off["during_over_before"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
