"""A sampling sweep after training: models x samplers on the batch stage, and the Pareto front of quality against
network evaluations (NFE).

    python -m jobs.sample_sweep --name NAME --data SHARDS --checkpoint [LABEL=]DIR|runs:/ID|models:/NAME/VERSION ...
                                [--ema-run RUN --sigma-rel 0.05,0.1] [--solvers euler,heun2,dopri5] [--steps 2,4,8]
                                [--grids uniform,edm] [--tolerances 1e-3,1e-5] [--cfg-scales 1,2]
                                [--num-samples N] [--budgets 1,2,4,8] [--tag-version models:/NAME/VERSION]
                                [--set sample.key=value] [--set eval.key=value] [--out DIR]

Models: each --checkpoint (a label before `=` names it; one unlabelled checkpoint is `model`), and each EMA length
--sigma-rel rebuilt from the training run --ema-run (a run folder or runs:/RUN_ID with `train.ema_snapshot_every`;
`flowray ema`'s reconstruction), labelled `ema-<sigma_rel>`. Samplers: each fixed-step solver (euler, midpoint,
heun2, rk4, ...; `jump` for MeanFlow and distilled models) at each --steps on each --grids (uniform, or edm: EDM's
rho = 7 noise levels as times; one step is the same on both, so it is made once), each adaptive solver at each
--tolerances (atol = rtol), and `sde` at each --steps; every sampler at each --cfg-scales (conditional models only).
Every point is checked against its model's method before Ray starts. All points share the noise: sample id i
starts from the same x_0 at every point (sample.seed), so their differences are the samplers', not the draws'.

Each point samples --num-samples (sample.* keys as `flowray sample` takes them, but not those the sweep sets) and is
scored as `flowray evaluate` scores samples (eval.* keys; FID, or FD in a classifier's features, with the floor
and the figure at the floor's count, `fd_matched`). The reference statistics are computed once and cached next to
the shards. Each point is an MLflow run nested under the sweep's, which is nested under the training run its models
share: the sweep's run holds front.png, front.md (every point, the front marked, the best point per NFE budget),
points.csv, and `best_at_nfe_<k>` as metrics and tags. --tag-version tags that registry version with the best
setting per budget (`flowray.best_at_nfe_<k>`). The sweep lives in OUT/NAME; the same command again skips the
scored points and finishes the rest. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, float_list, int_list, name_list, run_job


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the sweep's name: its folder under --out and its MLflow run")
    p.add_argument("--data", required=True, help="the ingest output the models were trained on")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[LABEL=]SPEC",
        help="a model to sweep (a folder, runs:/RUN_ID or models:/NAME/VERSION); repeat for more",
    )
    p.add_argument("--ema-run", default=None, help="a training run with EMA snapshots (folder, or runs:/RUN_ID)")
    p.add_argument("--sigma-rel", type=float_list, default=[], metavar="S[,S...]", help="EMA lengths to rebuild")
    p.add_argument("--solvers", type=name_list, default=["euler", "heun2", "dopri5"])
    p.add_argument("--steps", type=int_list, default=[2, 4, 8], help="steps of fixed-step solvers, jumps and sde")
    p.add_argument("--grids", type=name_list, default=["uniform"], help="time grids of fixed steps: uniform, edm")
    p.add_argument("--tolerances", type=float_list, default=[1e-3, 1e-5], help="atol = rtol of adaptive solvers")
    p.add_argument("--cfg-scales", type=float_list, default=[1.0], help="classifier-free guidance scales")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per point")
    p.add_argument("--budgets", type=int_list, default=[], help="NFE budgets of the best-per-budget table")
    p.add_argument("--tag-version", default=None, metavar="models:/NAME/VERSION", help="tag the best per budget")
    p.add_argument("--out", default="outputs/sample_sweeps", help="the folder of sweeps (local or s3://)")
    add_common(p)
    a = p.parse_args(argv)
    return run_job("sample sweep", a, lambda: _sweep(a))


def _sweep(a) -> dict:
    from pipelines.core.errors import ConfigError
    from pipelines.core.registry import resolve_checkpoint
    from pipelines.core.tracking import check_tracking_uri, tracking_uri
    from pipelines.sample_sweep import SampleSweepSpec, run_sample_sweep
    from pipelines.train.posthoc_ema import run_folder

    sample_sets = [s for s in a.overrides if s.startswith("sample.")]
    eval_sets = [s for s in a.overrides if s.startswith("eval.")]
    other = [s for s in a.overrides if s not in sample_sets + eval_sets]
    if other:
        raise ConfigError(f"--set {other[0]}: a sweep takes sample.* and eval.* keys only")
    if a.num_samples < 1:
        raise ConfigError(f"--num-samples: {a.num_samples} is not allowed; must be >= 1")
    if a.tag_version and (a.no_mlflow or not a.tag_version.startswith("models:/")):
        raise ConfigError(f"--tag-version: {a.tag_version!r} must be models:/NAME/VERSION, with MLflow on")
    labelled = [c.partition("=") for c in a.checkpoint]
    unlabelled = [spec for label, eq, spec in labelled if not eq]
    if len(a.checkpoint) > 1 and unlabelled:
        raise ConfigError(
            f"--checkpoint: {unlabelled[0]!r} has no label; with several checkpoints give each one as LABEL=SPEC"
        )
    uri = a.tracking_uri or tracking_uri()
    remote = [c for c in [*a.checkpoint, a.ema_run or ""] if "runs:/" in c or "models:/" in c]
    if not a.no_mlflow or remote:
        check_tracking_uri(uri, "--tracking-uri")
    checkpoints = {
        (label if eq else "model"): resolve_checkpoint(spec if eq else label, uri) for label, eq, spec in labelled
    }
    spec = SampleSweepSpec(
        name=a.name,
        data=a.data,
        checkpoints=checkpoints,
        ema_run=run_folder(a.ema_run, uri) if a.ema_run else None,
        sigma_rels=a.sigma_rel,
        solvers=a.solvers,
        steps=a.steps,
        grids=a.grids,
        tolerances=a.tolerances,
        cfg_scales=a.cfg_scales,
        budgets=a.budgets,
        out=a.out,
        sample_sets=[f"sample.num_samples={a.num_samples}", *sample_sets],
        eval_sets=eval_sets,
        tag_version=a.tag_version,
        uri=None if a.no_mlflow else uri,
    )
    result = run_sample_sweep(spec)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
