"""The demo: ingest scikit-learn's digits, then train FM-OT on local Ray (2 workers) with configs/digits-cpu.yaml.

    python -m jobs.demo [--set section.key=value ...]

Prints the MLflow run id, the final loss, the checkpoint path and where the sample grids are; the last stdout
line is one JSON object with the same.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.config import load_config
from pipelines.ingest import MANIFEST, ingest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits-cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    start = time.perf_counter()
    cfg = load_config(a.config, a.overrides)
    if not (Path(cfg.data.shards) / MANIFEST).exists():
        res = ingest("digits", cfg.data.shards, shards=4, test_fraction=0.1, seed=0)
        counts = {s: v["count"] for s, v in res.manifest["splits"].items()}
        print(f"ingested digits into {cfg.data.shards}: {counts}")
    from pipelines.train import run_training

    result = run_training(cfg)
    artifacts = _artifact_dir(result)
    print(f"\n=== demo finished in {time.perf_counter() - start:.0f} s ===")
    print(f"MLflow run id:    {result['run_id']} (experiment {result['experiment']}, {result['tracking_uri']})")
    print(f"final loss:       {result['metrics'].get('loss', float('nan')):.4f} at step "
          f"{int(result['metrics'].get('step', 0))}")
    print(f"checkpoint:       {result['checkpoint']}")
    print(f"sample grids:     {result['sample_grid']}" + (f" -> {artifacts}/samples" if artifacts else ""))
    print("compare runs:     mlflow ui --backend-store-uri " + result["tracking_uri"] + " (binds 127.0.0.1)")
    result["demo_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return result


def _artifact_dir(result: dict) -> str | None:
    try:
        from mlflow.tracking import MlflowClient

        uri = MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).info.artifact_uri
        return uri.removeprefix("file://")
    except Exception:  # only a convenience for the printout
        return None


if __name__ == "__main__":
    main()
