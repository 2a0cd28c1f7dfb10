"""Evaluate a trained model: bits/dim on a split (a Ray Data actor stage) and, given samples, their quality.

    python -m jobs.evaluate --checkpoint DIR|runs:/RUN_ID --data SHARDS [--samples DIR] [--set eval.key=value ...]

Keys (eval.*): split, max_images, draws (K dequantization draws), divergence (exact | hutchinson), probes,
method, atol, rtol, batch_size, actors, cpus_per_actor, seed, classifier_epochs.
Sample quality is the Fréchet distance and KID in the features of a small classifier trained on the same data set
(cached in SHARDS/classifier/), labelled "FD (<dataset> classifier)"; FID needs Inception-v3 weights, which are
not available offline, and the result says so. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.checkpoint import CheckpointError
from pipelines.config import ConfigError, apply_overrides
from pipelines.evaluate import EvalConfig, EvaluationError, validate_eval_config
from pipelines.ingest import IngestError
from pipelines.sample import SamplingError


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="an ingest output directory")
    p.add_argument("--samples", default=None, help="a jobs.sample output directory")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true")
    a = p.parse_args(argv)
    cfg = EvalConfig()
    apply_overrides(cfg, "eval", a.overrides)
    validate_eval_config(cfg)
    return a, cfg


def main(argv: list[str] | None = None) -> dict:
    try:
        a, cfg = parse(argv)
        from pipelines.config import Config, tracking_uri
        from pipelines.evaluate import run_evaluation
        from pipelines.tracking import resolve_checkpoint

        uri = a.tracking_uri or tracking_uri(Config())
        result = run_evaluation(resolve_checkpoint(a.checkpoint, uri), a.data, a.samples, cfg)
    except (EvaluationError, ConfigError, CheckpointError, SamplingError, IngestError, FileNotFoundError) as err:
        print(f"evaluation failed: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    lik = result["likelihood"]
    print(f"{lik['metric']}: {lik['mean']:.4f} ± {lik['stderr']:.4f} {lik['unit']} over {lik['n']} rows "
          f"(K={lik['draws']} dequantization draws, divergence={lik['divergence']}"
          + (f", H={lik['probes']} probes" if lik["probes"] else "") + f"; mean NFE {lik['mean_nfe']:.0f})")
    q = result.get("quality")
    if q and "fd" in q:
        print(f"{q['fd_label']}: {q['fd']:.3f}; KID {q['kid']:.4f} ± {q['kid_std']:.4f}; classifier test accuracy "
              f"{q['classifier_test_accuracy']:.3f}; sample classes {q['sample_class_histogram']}; {q['fid_note']}")
    elif q:
        print(f"W2 to fresh data: {q['w2']:.4f}")
    if not a.no_mlflow:
        from pipelines.evaluate import log_evaluation_run

        result["mlflow_run_id"] = log_evaluation_run(result, cfg, uri)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
