"""Sweep training hyperparameters on Ray Tune: one Ray Train run per trial, nested MLflow runs, optional ASHA.

    flowray sweep --config configs/digits-cpu.yaml --name lr-sweep --param optim.lr=1e-3,5e-4
                  [--param method.name=fm_ot,otcfm] [--seeds 0,1] [--space space.yaml]
                  [--scheduler fifo|asha --metric val_loss|loss --mode min|max --grace-steps N]
                  [--max-concurrent N] [--set section.key=value ...]

The trials are the grid of the --param values (or a YAML --space: `params: {section.key: [values]}`, `seeds: [..]`)
times the seeds; every trial's config is validated against the data before Ray starts. Each trial is an MLflow run
nested under the sweep's run (the experiment of the config), which ends with the trials' table (trials.md,
trials.csv) and the metric against step for every trial. ASHA stops trials whose validation loss (train.val_rows
fixed held-out rows, scored at every checkpoint) trails at a rung; the first rung is --grace-steps (default: the
first checkpoint). The same command again resumes a stopped sweep: finished trials are kept.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, int_list, run_job


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="the base training config (YAML)")
    p.add_argument("--name", required=True, help="the sweep's name: its MLflow run and its folder in storage")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2",
        help="a swept key and its values (repeat for a grid)",
    )
    p.add_argument("--space", default=None, help="a YAML search space (params:, seeds:) instead of --param")
    p.add_argument(
        "--seeds", type=int_list, default=None, help="comma-separated train.seed values of every grid point (default 0)"
    )
    p.add_argument("--scheduler", default="fifo", help="fifo (every trial runs to the end) or asha")
    p.add_argument("--metric", default="val_loss", help="what the scheduler and the table rank: val_loss or loss")
    p.add_argument("--mode", default="min", help="min or max")
    p.add_argument("--grace-steps", type=int, default=None, help="ASHA: steps before a trial may be stopped")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA: 1/N of the trials go on at each rung")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    add_common(p, tracking=False)
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    return run_job("sweep", a, lambda: _sweep(a))


def _sweep(a) -> dict:
    from pipelines.core.errors import ConfigError
    from pipelines.sweep import SweepSpec, load_space, parse_param, run_sweep

    if a.space and a.param:
        raise ConfigError("give the search space as --param flags or as --space FILE, not both")
    space, seeds = load_space(a.space) if a.space else ({}, None)
    for text in a.param:
        key, values = parse_param(text)
        if key in space:
            raise ConfigError(f"--param {key} is given twice")
        space[key] = values
    if a.seeds is not None:
        seeds = a.seeds
    spec = SweepSpec(
        a.name,
        a.config,
        a.overrides,
        space,
        seeds or [0],
        a.scheduler,
        a.metric,
        a.mode,
        a.max_concurrent,
        a.grace_steps,
        a.reduction_factor,
    )
    result = run_sweep(spec)
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
