"""Train a flow-matching model with Ray Train.

    python -m jobs.train --config configs/digits-cpu.yaml [--set section.key=value ...] [--dry-run]

The config is validated in full (and checked against the data manifest) before Ray starts; --dry-run prints the
resolved config and exits. Under `ray job submit` it joins that cluster, otherwise it starts a local Ray.
The last stdout line is one JSON object: run id, checkpoint path, final metrics.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.config import ConfigError, check_data, dump, load_config


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file (defaults apply when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        if not a.dry_run:
            check_data(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, a.dry_run


def main(argv: list[str] | None = None) -> dict | None:
    cfg, dry_run = parse(argv)
    if dry_run:
        print(dump(cfg))
        return None
    from pipelines.train import run_training

    result = run_training(cfg)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
