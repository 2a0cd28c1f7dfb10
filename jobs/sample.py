"""Draw many samples from a trained model on a Ray Data actor pool.

    python -m jobs.sample --checkpoint DIR|runs:/RUN_ID --num-samples N --out DIR [--set sample.key=value ...]

Keys (sample.*): solver (dopri5 | euler | midpoint | rk4 | ... | sde), atol, rtol, steps, sde_g, cfg_scale,
label, seed, block_size, blocks_per_call, actors, cpus_per_actor, gpus_per_actor, write_png.
Uses the EMA weights. A rerun into the same --out finishes only the missing shards. Logs an MLflow run nested
under the training run. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pipelines.checkpoint import CheckpointError
from pipelines.config import ConfigError, apply_overrides
from pipelines.sample import SampleConfig, SamplingError, validate_sample_config


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true")
    a = p.parse_args(argv)
    cfg = SampleConfig(num_samples=a.num_samples)
    apply_overrides(cfg, "sample", a.overrides)
    validate_sample_config(cfg)
    return a, cfg


def main(argv: list[str] | None = None) -> dict:
    try:
        a, cfg = parse(argv)
        from pipelines.config import Config, tracking_uri
        from pipelines.tracking import resolve_checkpoint

        uri = a.tracking_uri or tracking_uri(Config())
        checkpoint = resolve_checkpoint(a.checkpoint, uri)
        from pipelines.sample import run_sampling

        result = run_sampling(checkpoint, a.out, cfg)
    except (SamplingError, ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"sampling failed: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not a.no_mlflow:
        from pipelines.sample import log_sampling_run

        result["mlflow_run_id"] = log_sampling_run(result, asdict(cfg), uri)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
