"""The demo, the whole chain on local Ray: ingest scikit-learn's digits -> train FM-OT (2 workers,
configs/digits-cpu.yaml) -> sample 1,000 images (actor pool, dopri5) -> evaluate (bits/dim on the test split,
FD in a digits classifier's features) -> the comparison table from MLflow.

    python -m jobs.demo [--num-samples 1000] [--set section.key=value ...]

Prints the MLflow run ids, the final loss, the checkpoint path, where the sample grids are and the table; the
last stdout line is one JSON object with the same.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.config import load_config
from pipelines.ingest import MANIFEST, ingest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits-cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--num-samples", type=int, default=1000)
    a = p.parse_args(argv)
    start = time.perf_counter()
    cfg = load_config(a.config, a.overrides)
    if not (Path(cfg.data.shards) / MANIFEST).exists():
        res = ingest("digits", cfg.data.shards, shards=4, test_fraction=0.1, seed=0)
        counts = {s: v["count"] for s, v in res.manifest["splits"].items()}
        print(f"ingested digits into {cfg.data.shards}: {counts}")
    from pipelines.train import run_training

    result = run_training(cfg)
    train_s = time.perf_counter() - start
    result["chain"] = _sample_and_evaluate(cfg, result, a.num_samples)
    artifacts = _artifact_dir(result)
    print(f"\n=== demo finished in {time.perf_counter() - start:.0f} s ===")
    print(f"MLflow run id:    {result['run_id']} (experiment {result['experiment']}, {result['tracking_uri']})")
    print(f"final loss:       {result['metrics'].get('loss', float('nan')):.4f} at step "
          f"{int(result['metrics'].get('step', 0))}")
    print(f"checkpoint:       {result['checkpoint']}")
    print(f"sample grids:     {result['sample_grid']}" + (f" -> {artifacts}/samples" if artifacts else ""))
    print(f"training:         {train_s:.0f} s; sampling {result['chain']['sample']['wall_s']:.0f} s; "
          f"evaluation {result['chain']['evaluate_s']:.0f} s")
    print(f"samples:          {result['chain']['sample']['out']} (MLflow run {result['chain']['sample_run_id']})")
    print(f"evaluation run:   {result['chain']['eval_run_id']}; {result['chain']['fid_note']}")
    print("compare runs:     mlflow ui --backend-store-uri " + result["tracking_uri"] + " (binds 127.0.0.1)")
    print("\n" + result["chain"]["table"])
    result["demo_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return result


def _sample_and_evaluate(cfg, result: dict, num_samples: int) -> dict:
    from dataclasses import asdict

    from pipelines.compare import collect, markdown, table
    from pipelines.evaluate import EvalConfig, log_evaluation_run, run_evaluation
    from pipelines.sample import SampleConfig, log_sampling_run, run_sampling

    uri, ckpt = result["tracking_uri"], result["checkpoint"]
    out = Path("outputs/samples") / result["run_id"]
    scfg = SampleConfig(num_samples=num_samples, solver="dopri5", atol=1e-5, rtol=1e-5, block_size=125, actors=2)
    sample = run_sampling(ckpt, out, scfg)
    sample_run = log_sampling_run(sample, asdict(scfg), uri)
    start = time.perf_counter()
    ecfg = EvalConfig(draws=1, divergence="hutchinson", probes=1, batch_size=60, actors=2)
    ev = run_evaluation(ckpt, cfg.data.shards, str(out), ecfg)
    eval_run = log_evaluation_run(ev, ecfg, uri)
    rows = table(collect(uri, result["experiment"], f"tags.`flowray.train_run_id` = '{result['run_id']}'"))
    return {"sample": sample, "sample_run_id": sample_run, "eval_run_id": eval_run, "evaluation": ev,
            "evaluate_s": time.perf_counter() - start, "fid_note": ev["quality"]["fid_note"],
            "table": markdown(rows)}


def _artifact_dir(result: dict) -> str | None:
    try:
        from mlflow.tracking import MlflowClient

        uri = MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).info.artifact_uri
        return uri.removeprefix("file://")
    except Exception:  # only a convenience for the printout
        return None


if __name__ == "__main__":
    main()
