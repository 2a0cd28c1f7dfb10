"""Post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3): rebuild a training run's EMA at other lengths after training.

    python -m jobs.ema --run outputs/ray_results/NAME --sigma-rel 0.03,0.05,0.08,0.12 [--step N] [--out DIR]

The run must have kept snapshots of its power-function EMA profiles (`train.ema_snapshot_every` > 0; the profiles
are `optim.ema_sigma_rels`, 0.05 and 0.10 by default). Each sigma_rel (the EMA's length as the relative standard
deviation of its averaging profile) becomes a checkpoint folder that `flowray sample` / `evaluate` take as
`--checkpoint`, and a run nested under the training run in MLflow (its parameters, the fit error of the profile, and
the checkpoint's location). `--run` is the run's folder (train.storage_path/train.run_name, local or s3://) or
`runs:/RUN_ID` of the training run. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, float_list, run_job


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run's folder, or runs:/RUN_ID")
    p.add_argument(
        "--sigma-rel",
        required=True,
        type=float_list,
        metavar="S[,S...]",
        help="the EMA lengths to rebuild, each in (0, 0.2887)",
    )
    p.add_argument(
        "--step",
        type=int,
        default=None,
        help="the run as it stood at this step (default: its last snapshot); snapshots after it are not used",
    )
    p.add_argument("--out", default=None, help="the folder of the rebuilt checkpoints (default: RUN/posthoc_ema)")
    add_common(p, overrides=False)
    a = p.parse_args(argv)
    return run_job("ema", a, lambda: _ema(a))


def _ema(a) -> dict:
    from pipelines.core.tracking import check_tracking_uri, tracking_uri
    from pipelines.train.posthoc_ema import rebuild, run_folder

    uri = a.tracking_uri or tracking_uri()
    if not a.no_mlflow or a.run.startswith("runs:/"):
        check_tracking_uri(uri, "--tracking-uri")
    run_dir = run_folder(a.run, uri)
    rebuilt = rebuild(run_dir, a.sigma_rel, a.step, a.out)
    for r in rebuilt:
        print(
            f"[flowray] sigma_rel {r.sigma_rel:g} (gamma {r.gamma:.2f}) at step {r.step} from {r.snapshots} "
            f"snapshots, profile fit error {r.fit_error:.2e}: {r.checkpoint}",
            flush=True,
        )
    runs: list[str | None] = [None] * len(rebuilt) if a.no_mlflow else [_log(uri, r) for r in rebuilt]
    result = {
        "run_dir": run_dir,
        "rebuilt": [dict(r.to_dict(), mlflow_run_id=run_id) for r, run_id in zip(rebuilt, runs, strict=True)],
    }
    print(json.dumps(result))
    return result


def _log(uri: str, r) -> str:
    """A run nested under the training run: the length, its fit, and where its checkpoint lies."""
    from pipelines.core.checkpoint import load_meta
    from pipelines.core.run_logger import SafeLogger
    from pipelines.core.tracking import start_child_run

    meta = load_meta(r.checkpoint)
    run_id = start_child_run(uri, meta.mlflow_run_id, "ema", f"ema-{r.sigma_rel:g}-step{r.step}")
    log = SafeLogger(uri, run_id)
    log.params(
        {
            "sigma_rel": r.sigma_rel,
            "gamma": r.gamma,
            "step": r.step,
            "snapshots": r.snapshots,
            "profiles": (meta.posthoc_ema or {})["profiles"],
        }
    )
    log.metrics({"fit_error": r.fit_error}, step=r.step)
    log.tags({"flowray.checkpoint": r.checkpoint, "flowray.method": meta.method_name})
    log.finish()
    return run_id


if __name__ == "__main__":
    main()
