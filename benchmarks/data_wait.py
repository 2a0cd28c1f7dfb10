"""Data wait of a whole training run, and OT-CFM's step against I-CFM's, in the Ray pipeline: every worker fed by
its own Ray Data stream that pairs each step in tasks on CPU workers (`pipelines.train.stream`).

    python -m benchmarks.data_wait [--steps 600] [--buffer 96]
    python -m benchmarks.data_wait --methods icfm,otcfm [--steps 600] [--set method.ot_scope=global]
    python -m benchmarks.data_wait --methods icfm,otcfm --config configs/toy2d.yaml --source toy2d:checkerboard

Default: trains `configs/digits-cpu.yaml` (the digits UNet, 2 workers, global batch 128; 600 steps are 53 passes
over the 1,437 training rows) twice in one local Ray: with `data.buffer_batches=BUFFER` and with 0 (the stream
read in the training loop). Reports each run's data-wait fraction over every step after the first
(`data_wait_fraction_run`), the first step's wait (the stream's start-up, apart) and the training wall time.
With --methods, one run per method at the given buffer, and each run's mean throughput over its logging windows
after the first (from MLflow), as step time per global batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--config", default="configs/digits-cpu.yaml")
    p.add_argument("--source", default="digits", help="the ingest source of the config's data")
    p.add_argument("--buffer", type=int, default=96)
    p.add_argument("--methods", default=None, help="comma-separated methods to compare at --buffer")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config override for every run, e.g. method.ot_scope=global",
    )
    args = p.parse_args()
    import ray
    from mlflow.tracking import MlflowClient

    from pipelines.core.runtime import init_ray
    from pipelines.ingest.run import ingest
    from pipelines.train.config import load_config
    from pipelines.train.driver import run_training

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ingest(args.source, Path(tmp) / "data", shards=2)
        init_ray()
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        runs = (
            [(m, args.buffer) for m in args.methods.split(",")]
            if args.methods
            else [("fm_ot", args.buffer), ("fm_ot", 0)]
        )
        for method, buffer in runs:
            cfg = load_config(
                args.config,
                [
                    f"data.shards={Path(tmp) / 'data'}",
                    f"train.steps={args.steps}",
                    f"data.buffer_batches={buffer}",
                    f"train.storage_path={Path(tmp) / 'runs'}",
                    f"train.run_name={method}-buffer-{buffer}",
                    "train.sample_every=0",
                    f"method.name={method}",
                    f"mlflow.tracking_uri={uri}",
                    "mlflow.experiment=bench",
                    *args.overrides,
                ],
            )
            res = run_training(cfg)
            m = res.metrics
            ips = [x.value for x in MlflowClient(uri).get_metric_history(res.run_id, "images_per_s")][1:]
            global_batch = cfg.train.batch_size * cfg.ray.num_workers
            rows.append(
                {
                    "method": method,
                    "buffer_batches": buffer,
                    "data_wait_fraction_run": round(m["data_wait_fraction_run"], 4),
                    "data_startup_s": round(m["data_startup_s"], 2),
                    "training_wall_s": res.wall_s,
                    "mean_images_per_s": round(sum(ips) / len(ips), 1),
                    "step_ms": round(1e3 * global_batch * len(ips) / sum(ips), 2),
                }
            )
        ray.shutdown()
    print(json.dumps({"config": args.config, "steps": args.steps, "overrides": args.overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
