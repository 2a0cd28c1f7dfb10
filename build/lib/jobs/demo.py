"""The demo, the whole chain on local Ray: ingest scikit-learn's digits -> train FM-OT (2 workers,
configs/digits-cpu.yaml) -> sample 1,000 images (actor pool, dopri5) -> evaluate (bits/dim on the test split,
FD in a digits classifier's features) -> the comparison table from MLflow.

    python -m jobs.demo [--num-samples 1000] [--set section.key=value ...] [--verbose]

Prints one line per stage, the MLflow run ids, the final loss, the checkpoint path, where the sample grids are and
the table; the last stdout line is one JSON object with the same.
"""

from __future__ import annotations

import argparse
import json
import time

from jobs.cli import add_common, run_job


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits-cpu.yaml")
    p.add_argument("--num-samples", type=int, default=1000)
    add_common(p, tracking=False)
    a = p.parse_args(argv)
    return run_job("demo", a, lambda: _demo(a))


def _demo(a) -> dict:
    from pipelines.batch.config import EvalConfig, SampleConfig
    from pipelines.chain import ensure_ingested, train_sample_evaluate
    from pipelines.compare import collect, markdown, table
    from pipelines.train.config import load_config

    start = time.perf_counter()
    cfg = load_config(a.config, a.overrides)
    ensure_ingested("digits", cfg.data.shards)
    scfg = SampleConfig(num_samples=a.num_samples, solver="dopri5", atol=1e-5, rtol=1e-5, block_size=125, actors=2)
    ecfg = EvalConfig(draws=1, divergence="hutchinson", probes=1, batch_size=60, actors=2)
    chain = train_sample_evaluate(cfg, [scfg], ecfg, "outputs/samples")
    result, solve = chain.train.to_dict(), chain.solves[0]
    rows = table(
        collect(result["tracking_uri"], result["experiment"], f"tags.`flowray.train_run_id` = '{result['run_id']}'")
    )
    quality = solve.evaluation.quality
    if quality is None:  # the demo evaluates its samples: a quality is always there
        raise RuntimeError("internal: the demo's evaluation returned no sample quality")
    result["chain"] = {**solve.to_dict(), "table": markdown(rows)}
    artifacts = _artifact_dir(result)
    print(f"\n=== demo finished in {time.perf_counter() - start:.0f} s ===")
    print(f"MLflow run id:    {result['run_id']} (experiment {result['experiment']}, {result['tracking_uri']})")
    print(
        f"final loss:       {result['metrics'].get('loss', float('nan')):.4f} at step "
        f"{int(result['metrics'].get('step', 0))}"
    )
    print(f"checkpoint:       {result['checkpoint']}")
    print(f"MLflow model:     {result.get('mlflow_model')}")
    print(f"sample grids:     {result['sample_grid']}" + (f" -> {artifacts}/samples" if artifacts else ""))
    print(f"training:         {result['wall_s']:.0f} s; sampling and evaluation {solve.seconds:.0f} s")
    print(f"samples:          {solve.sample.out} (MLflow run {solve.sample.mlflow_run_id})")
    print(f"evaluation run:   {solve.evaluation.mlflow_run_id}")
    print(
        f"sample quality:   {quality.fd_label} {quality.fd:.3f} against the {quality.reference_split} split "
        f"({quality.num_samples} samples, {quality.num_reference} reference images); precision "
        f"{quality.precision:.3f}, recall {quality.recall:.3f}"
    )
    print(
        f"                  at {quality.num_matched} images: the model {quality.fd_matched:.3f}, held-out "
        f"real {quality.floor_split} images (the floor) {quality.fd_floor:.3f}"
    )
    print(f"                  {quality.fid_note}")
    print("compare runs:     mlflow ui --backend-store-uri " + result["tracking_uri"] + " (binds 127.0.0.1)")
    print("\n" + result["chain"]["table"])
    result["demo_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, default=str))
    return result


def _artifact_dir(result: dict) -> str | None:
    try:
        from mlflow.tracking import MlflowClient

        uri = MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).info.artifact_uri
        return uri.removeprefix("file://")
    except Exception:  # only a convenience for the printout
        return None


if __name__ == "__main__":
    main()
