"""The train -> sample -> evaluate chain that the demo and the reproduction run: one model, one or more samplers,
bits/dim once per model and sample quality for every sampler, each stage logged to MLflow under the training run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.batch.config import EvalConfig, SampleConfig
from pipelines.batch.evaluate import (
    EvaluationResult,
    log_evaluation_run,
    open_evaluation_run,
    run_evaluation,
    sample_quality,
)
from pipelines.batch.sample import log_sampling_run, open_sampling_run, run_sampling
from pipelines.batch.samples import SamplingResult
from pipelines.core import storage
from pipelines.core.manifest import MANIFEST, Manifest
from pipelines.core.runtime import stage
from pipelines.core.tracking import monitored_run
from pipelines.ingest.run import ingest
from pipelines.train.config import Config, check_data
from pipelines.train.driver import run_training


def ensure_ingested(source: str, shards: str | Path, num_shards: int = 4) -> None:
    """Ingest `source` into `shards` unless a manifest is already there."""
    if storage.is_file(storage.join(str(shards), MANIFEST)):
        return
    res = ingest(source, shards, shards=num_shards)
    counts = {s: v["count"] for s, v in res.manifest["splits"].items()}
    stage(f"ingested {source} into {shards}: {counts}")


def solver_tag(scfg: SampleConfig) -> str:
    """A short name of a sampler for output folders: dopri5, euler20, sde100."""
    from fm.solvers import is_adaptive

    return scfg.solver if is_adaptive(scfg.solver) else f"{scfg.solver}{scfg.steps}"


@dataclass
class SolveRecord:
    """One sampler of a chain: its samples and their evaluation (each with its MLflow run id), and the seconds the
    two took."""

    solver: str  # `solver_tag`
    sample: SamplingResult
    evaluation: EvaluationResult
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def sample_and_evaluate(trained: dict, manifest: Manifest, solves: list[SampleConfig], ecfg: EvalConfig,
                        samples_root: str | Path, system_metrics: bool = True) -> list[SolveRecord]:
    """For a trained model (a `run_training` result) on the data of `manifest`: sample with every sampler into
    samples_root/<tag>, and evaluate: bits/dim once (with the first sampler's run), sample quality for each. Each
    stage's MLflow run holds its system metrics (`system_metrics`)."""
    uri, ckpt = trained["tracking_uri"], trained["checkpoint"]
    records, first = [], None
    for scfg in solves:
        start = time.perf_counter()
        run_id = open_sampling_run(uri, ckpt, asdict(scfg))
        with monitored_run(uri, run_id, system_metrics):
            samples = run_sampling(ckpt, Path(samples_root) / solver_tag(scfg), scfg)
        log_sampling_run(samples, asdict(scfg), uri, run_id)
        run_id = open_evaluation_run(uri, ckpt)
        with monitored_run(uri, run_id, system_metrics):
            if first is None:
                ev = first = run_evaluation(ckpt, manifest, samples.out, ecfg)
            else:  # the likelihood does not depend on the sampler: reuse it, measure quality only
                ev = first.with_samples(sample_quality(manifest, samples.out, ecfg), samples.out)
        log_evaluation_run(ev, ecfg, uri, run_id)
        records.append(SolveRecord(solver_tag(scfg), samples, ev, round(time.perf_counter() - start, 1)))
    return records


def train_sample_evaluate(cfg: Config, solves: list[SampleConfig], ecfg: EvalConfig,
                          samples_root: str | Path) -> dict:
    """Train per `cfg`, then `sample_and_evaluate` the final model; returns {"train": the `run_training` result,
    "solves": [SolveRecord, ...]}. The manifest is read (and checked against the config) once."""
    manifest = check_data(cfg)
    trained = run_training(cfg, manifest)
    return {"train": trained, "solves": sample_and_evaluate(trained, manifest, solves, ecfg,
                                                            Path(samples_root) / trained["run_id"],
                                                            cfg.mlflow.system_metrics)}
