"""Draw many samples from a trained model on a Ray Data actor pool.

    python -m jobs.sample --checkpoint DIR|runs:/RUN_ID|models:/NAME/VERSION|models:/NAME@ALIAS --num-samples N
                          --out DIR [--set sample.key=value ...] [--verbose]

The sample.* keys and their defaults are listed below (from `pipelines.batch.config.SampleConfig`); the solver is
dopri5, euler, midpoint, rk4, another torchdiffeq solver, sde, or jump for MeanFlow. Uses the EMA weights. A
rerun into the same --out finishes only the missing shards, and a larger --num-samples there samples only the new
blocks (other settings must match). Logs an MLflow run nested under the training run. The last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from jobs.cli import add_common, key_list, run_job, tracking_and_checkpoint


def main(argv: list[str] | None = None) -> dict:
    from pipelines.batch.config import SampleConfig

    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=key_list("sample", SampleConfig()),
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True)
    add_common(p)
    a = p.parse_args(argv)
    return run_job("sampling", a, lambda: _sample(a))


def _sample(a) -> dict:
    from pipelines.batch.config import SampleConfig, validate_sample_config
    from pipelines.batch.sample import log_sampling_run, open_sampling_run, run_sampling
    from pipelines.core.settings import apply_overrides
    from pipelines.core.system_metrics import monitored_run

    cfg = SampleConfig(num_samples=a.num_samples)
    apply_overrides(cfg, "sample", a.overrides)
    validate_sample_config(cfg)
    uri, checkpoint = tracking_and_checkpoint(a)
    run_id = None if a.no_mlflow else open_sampling_run(uri, checkpoint, asdict(cfg))
    with monitored_run(uri, run_id, not a.no_system_metrics):
        result = run_sampling(checkpoint, a.out, cfg)
    if run_id:
        log_sampling_run(result, asdict(cfg), uri, run_id)
    print(json.dumps(result.to_dict()))
    return result.to_dict()


if __name__ == "__main__":
    main()
