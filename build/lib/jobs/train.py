"""Train a flow-matching model with Ray Train.

    python -m jobs.train --config configs/digits-cpu.yaml [--set section.key=value ...] [--dry-run] [--verbose]

The config is validated in full (and checked against the data manifest) before Ray starts; --dry-run prints the
resolved config and exits. Under `ray job submit` it joins that cluster, otherwise it starts a local Ray.
The last stdout line is one JSON object: run id, checkpoint path, final metrics.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, run_job


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file (defaults apply when omitted)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest first")
    p.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of a config file (configs/train.schema.json) and exit",
    )
    add_common(p, tracking=False)
    return p


def main(argv: list[str] | None = None) -> dict | None:
    a = parser().parse_args(argv)
    return run_job("training", a, lambda: _train(a))


def _train(a) -> dict | None:
    from pipelines.core.settings import dump
    from pipelines.train.against_data import check_data
    from pipelines.train.config import load_config, schema

    if a.schema:
        print(json.dumps(schema(), indent=1))
        return None
    cfg = load_config(a.config, a.overrides)
    if a.dry_run:
        print(dump(cfg))
        return None
    manifest = check_data(cfg)  # data errors before Ray starts (shard footers and row counts are always checked)
    if a.verify:
        manifest.verify()
    from pipelines.chain import quality_callbacks
    from pipelines.train.driver import run_training

    result = run_training(cfg, manifest, callbacks=quality_callbacks(cfg, manifest)).to_dict()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
