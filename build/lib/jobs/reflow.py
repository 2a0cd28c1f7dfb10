"""Rectified Flow's reflow: a trained flow's own pairs (x_0, x_1 = ODE(x_0)) become the next model's training data.

    flowray reflow --checkpoint DIR|runs:/RUN_ID --data SHARDS --num-pairs N [--config FILE] [--rounds K]
                   [--from-scratch] [--pair-solver dopri5] [--pair-seed S] [--solvers euler:1,euler:2,dopri5]
                   [--num-samples M]
                   [--no-baseline] [--distill] [--name reflow] [--out outputs/reflow]
                   [--set section.key=value ...] [--sample-set sample.key=value ...] [--eval-set eval.key=value ...]

Each round samples N pairs from the last model (--pair-solver; each sample's noise is regenerated from its seed,
--pair-seed, which the evaluation samplers never share: models are scored on fresh noise),
ingests them as a `samples:DIR` source, trains method `reflow` on them with the training config (--config and --set;
warm-started from the last model unless --from-scratch), then samples M images with every --solvers entry and
evaluates them on the real data (--data: FD with its floor, bits/dim, straightness). With the baseline (the
default), the generating model is sampled and evaluated with the same solvers first. With --distill, one more round
distills the last model into a one-step map (Liu et al. 2022, Sec. 2.3): pairs from it, method `distill` warm-started
from it, sampled in one jump and scored beside the others' one-step column. One MLflow run holds the
chain, each round's training run nested under it, and the table (reflow.md). The same command again reuses what a
stopped chain finished (sampled blocks, an ingested round, a round's training run) and evaluates again.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, run_job


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the generating model: DIR, runs:/RUN_ID or models:/...")
    p.add_argument("--data", required=True, help="the real data's shards (what the models are evaluated on)")
    p.add_argument("--num-pairs", type=int, required=True, help="pairs sampled each round")
    p.add_argument("--config", default=None, help="the training config of every round (YAML)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="K reflows (the (K+1)-rectified flow of a generator trained on independent pairs)",
    )
    p.add_argument("--from-scratch", action="store_true", help="start each round from a random init")
    p.add_argument("--pair-solver", default="dopri5", help="the ODE solver of the pairs (SOLVER or SOLVER:STEPS)")
    p.add_argument(
        "--pair-seed",
        type=int,
        default=None,
        help="the pairs' noise seed (default: sample.seed + 1; never the evaluation samplers' seed)",
    )
    p.add_argument(
        "--solvers",
        default="euler:1,euler:2,dopri5",
        help="evaluation samplers, comma-separated SOLVER or SOLVER:STEPS",
    )
    p.add_argument("--num-samples", type=int, default=1000, help="samples per evaluation sampler")
    p.add_argument("--no-baseline", action="store_true", help="do not evaluate the generating model first")
    p.add_argument(
        "--distill",
        action="store_true",
        help="one more round: the last model distilled into a one-step map (method distill, sampled in one jump)",
    )
    p.add_argument("--name", default="reflow", help="the chain's MLflow run and its folder under --out")
    p.add_argument("--out", default="outputs/reflow", help="pairs, their shards and the samples, per round")
    p.add_argument(
        "--sample-set",
        action="append",
        default=[],
        metavar="sample.KEY=VALUE",
        help="a sampling setting of every sampler (block_size, actors, seed, ...)",
    )
    p.add_argument("--eval-set", action="append", default=[], metavar="eval.KEY=VALUE", help="an evaluation setting")
    p.add_argument("--no-system-metrics", action="store_true", help="no MLflow system metrics in the stages' runs")
    add_common(p, tracking=False)
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    return run_job("reflow", a, lambda: _reflow(a))


def _reflow(a) -> dict:
    from dataclasses import replace

    from pipelines.batch.config import EvalConfig, SampleConfig
    from pipelines.core.registry import resolve_checkpoint
    from pipelines.core.settings import apply_overrides
    from pipelines.core.tracking import tracking_uri
    from pipelines.reflow import ReflowSpec, run_reflow, solves_from
    from pipelines.train.config import load_config

    base = SampleConfig()
    apply_overrides(base, "sample", a.sample_set)
    shared = {
        k: getattr(base, k)
        for k in (
            "block_size",
            "blocks_per_call",
            "actors",
            "cpus_per_actor",
            "gpus_per_actor",
            "seed",
            "precision",
            "atol",
            "rtol",
            "cfg_scale",
        )
    }
    (pair,) = solves_from(a.pair_solver, 1, shared)
    solves = solves_from(a.solvers, a.num_samples, shared)
    ecfg = EvalConfig()
    apply_overrides(ecfg, "eval", a.eval_set)
    uri = tracking_uri(load_config(a.config, a.overrides).mlflow.tracking_uri)
    spec = ReflowSpec(
        checkpoint=resolve_checkpoint(a.checkpoint, uri),
        data=a.data,
        num_pairs=a.num_pairs,
        config=a.config,
        overrides=a.overrides,
        rounds=a.rounds,
        warm_start=not a.from_scratch,
        pair_sampler=replace(pair, num_samples=a.num_pairs, seed=base.seed + 1 if a.pair_seed is None else a.pair_seed),
        solves=solves,
        eval_config=ecfg,
        out=a.out,
        name=a.name,
        baseline=not a.no_baseline,
        system_metrics=not a.no_system_metrics,
        distill=a.distill,
    )
    result = run_reflow(spec)
    out = {k: v for k, v in result.items() if k != "rounds"}
    out["rounds"] = [
        {k: v.to_dict() if k == "train" else v for k, v in r.items() if k != "records"} for r in result["rounds"]
    ]
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
