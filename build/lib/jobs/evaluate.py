"""Evaluate a trained model: bits/dim on a split (a Ray Data actor stage) and, given samples, their quality.

    python -m jobs.evaluate --checkpoint DIR|runs:/RUN_ID|models:/NAME/VERSION --data SHARDS [--samples DIR]
                            [--set eval.key=value ...] [--verbose]

The eval.* keys and their defaults are listed below (from `pipelines.batch.config.EvalConfig`): draws are the K
dequantization draws, divergence is exact or hutchinson (with probes), solver any torchdiffeq solver (steps for a
fixed-step one). Solver settings are checked before Ray starts.
Sample quality (eval.features): FID in the TF-FID Inception-v3 features (images from 16x16 up), or the Fréchet
distance in the features of a small classifier trained on the same data set (cached in
SHARDS/classifier/epochs<E>-seed<S>/), labelled "FD (<dataset> classifier)"; both against eval.reference_split
(train), with the floor (the same metric for held-out eval.floor_split images), KID and precision/recall. Features
run as a Ray Data actor stage (eval.actors, eval.gpus_per_actor) with bounded driver memory; the reference
statistics are cached in SHARDS/feature_stats/. Points on a manifold: NLL in nats by the Riemannian change of
variables, and the geodesic W2 from the samples to the test split beside its floor. Snapshot methods (am,
snapshot_icfm, snapshot_otcfm): the test split's first snapshot carried through every observed time on an actor
stage, W2 to each time's test rows beside the floor. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, key_list, run_job, tracking_and_checkpoint


def main(argv: list[str] | None = None) -> dict:
    from pipelines.batch.config import EvalConfig

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=key_list("eval", EvalConfig())
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="an ingest output directory")
    p.add_argument("--samples", default=None, help="a jobs.sample output directory")
    add_common(p)
    a = p.parse_args(argv)
    return run_job("evaluation", a, lambda: _evaluate(a))


def _evaluate(a) -> dict:
    from pipelines.batch.config import EvalConfig, validate_eval_config
    from pipelines.batch.evaluate import log_evaluation_run, open_evaluation_run, run_evaluation
    from pipelines.core.registry import tag_model_version
    from pipelines.core.settings import apply_overrides
    from pipelines.core.system_metrics import monitored_run

    cfg = EvalConfig()
    apply_overrides(cfg, "eval", a.overrides)
    validate_eval_config(cfg)
    uri, checkpoint = tracking_and_checkpoint(a)
    run_id = None if a.no_mlflow else open_evaluation_run(uri, checkpoint)
    with monitored_run(uri, run_id, not a.no_system_metrics):
        result = run_evaluation(checkpoint, a.data, a.samples, cfg)
    tr, lik, q = result.transport, result.likelihood, result.quality
    if tr is not None:
        for t, w, f in zip(tr.times, tr.w2, tr.w2_floor, strict=True):
            print(
                f"t={t}: W2 {w:.4f} from {tr.n_start} transported first-snapshot rows to the held-out rows; "
                f"floor (training rows) {f:.4f}"
            )
    elif lik is not None:  # None: a MeanFlow model, which has no likelihood
        print(
            f"{lik.metric}: {lik.mean:.4f} ± {lik.stderr:.4f} {lik.unit} over {lik.n} rows "
            f"(K={lik.draws} dequantization draws, divergence={lik.divergence}"
            + (f", H={lik.probes} probes" if lik.probes else "")
            + f"; mean NFE {lik.mean_nfe:.0f})"
        )
    if q is not None and q.fd is not None:
        floor = (
            f"; floor {q.fd_floor:.3f} ({q.num_floor} held-out {q.floor_split} images)"
            if q.fd_floor is not None
            else ""
        )
        print(
            f"{q.fd_label}: {q.fd:.3f} ({q.num_samples} samples against {q.num_reference} "
            f"{q.reference_split} images){floor}; KID {q.kid:.4f} ± {q.kid_std:.4f}; precision "
            f"{q.precision:.3f}, recall {q.recall:.3f} (k=3, subsets {q.pr_subset}); {q.fid_note}"
        )
    elif q is not None and q.w2_floor is not None:
        print(f"geodesic W2 to {q.num_reference} test rows: {q.w2:.4f}; floor (as many training rows) {q.w2_floor:.4f}")
    elif q is not None:
        print(f"W2 to fresh data: {q.w2:.4f}")
    if run_id is not None:  # (None with --no-mlflow)
        log_evaluation_run(result, cfg, uri, run_id)
        version = tag_model_version(uri, a.checkpoint, result.headline())  # a registry version: its latest scores
        if version:
            print(f"tagged model version {version} with this evaluation")
    print(json.dumps(result.to_dict()))
    return result.to_dict()


if __name__ == "__main__":
    main()
