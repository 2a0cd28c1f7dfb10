"""Data wait of a whole training run, epoch boundaries included: the reader thread's buffer against none.

    python -m benchmarks.data_wait [--steps 600] [--buffer 32]

Trains `configs/digits-cpu.yaml` (2 workers, global batch 128, 20 passes per Ray Data epoch, so 600 steps cross two
epoch boundaries) twice in one local Ray: with `data.buffer_batches=BUFFER` and with 0 (the stream read in the
training loop, as before). Reports each run's data-wait fraction over every step after the first
(`data_wait_fraction_run`), the first step's wait (the stream's start-up, apart) and the training wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--buffer", type=int, default=96)
    args = p.parse_args()

    import ray

    from pipelines.config import load_config
    from pipelines.ingest import ingest
    from pipelines.runtime import init_ray
    from pipelines.train import run_training

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ingest("digits", Path(tmp) / "digits", shards=2)
        init_ray()
        for buffer in (args.buffer, 0):
            cfg = load_config("configs/digits-cpu.yaml", [
                f"data.shards={Path(tmp) / 'digits'}", f"train.steps={args.steps}", f"data.buffer_batches={buffer}",
                f"train.storage_path={Path(tmp) / 'runs'}", f"train.run_name=buffer-{buffer}", "train.sample_every=0",
                f"mlflow.tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}", "mlflow.experiment=bench"])
            res = run_training(cfg)
            m = res["metrics"]
            rows.append({"buffer_batches": buffer, "data_wait_fraction_run": round(m["data_wait_fraction_run"], 4),
                         "data_startup_s": round(m["data_startup_s"], 2), "training_wall_s": res["wall_s"]})
        ray.shutdown()
    print(json.dumps({"steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
