"""The train -> sample -> evaluate chain that the demo and the reproduction run: one model, one or more samplers,
bits/dim once per model and sample quality for every sampler, each stage logged to MLflow under the training run."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from pipelines.batch.config import EvalConfig, SampleConfig, validate_eval_config, validate_sample_config
from pipelines.batch.evaluate import log_evaluation_run, open_evaluation_run, run_evaluation
from pipelines.batch.quality import sample_quality
from pipelines.batch.results import EvaluationResult
from pipelines.batch.sample import log_sampling_run, open_sampling_run, run_sampling
from pipelines.core import storage
from pipelines.core.checkpoint import load_meta
from pipelines.core.manifest import MANIFEST, Manifest
from pipelines.core.run_logger import SafeLogger
from pipelines.core.runtime import configure_ray_data, resource_args, stage
from pipelines.core.samples import SamplingResult
from pipelines.core.system_metrics import monitored_run
from pipelines.core.tracking import tracking_uri
from pipelines.ingest.run import ingest
from pipelines.train.against_data import check_data
from pipelines.train.config import Config
from pipelines.train.driver import TrainResult, run_training


def ensure_ingested(source: str, shards: str | Path, num_shards: int = 4) -> None:
    """Ingest `source` into `shards` unless a manifest is already there."""
    if storage.is_file(storage.join(str(shards), MANIFEST)):
        return
    res = ingest(source, shards, shards=num_shards)
    counts = {s: v["count"] for s, v in res.manifest["splits"].items()}
    stage(f"ingested {source} into {shards}: {counts}")


def solver_tag(scfg: SampleConfig) -> str:
    """A short name of a sampler for output folders: dopri5, euler20, heun24-edm, sde100."""
    from fm.solvers import is_adaptive

    if is_adaptive(scfg.solver):
        return scfg.solver
    return f"{scfg.solver}{scfg.steps}" + (f"-{scfg.time_grid}" if scfg.time_grid != "uniform" else "")


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


def sample_and_evaluate(
    uri: str,
    ckpt: str,
    manifest: Manifest,
    solves: list[SampleConfig],
    ecfg: EvalConfig,
    samples_root: str | Path,
    system_metrics: bool = True,
) -> list[SolveRecord]:
    """For a checkpoint `ckpt` of a model trained on the data of `manifest`: sample with every sampler into
    samples_root/<tag>, and evaluate: bits/dim once (with the first sampler's run), sample quality for each. Each
    stage's MLflow run (tracking URI `uri`) holds its system metrics (`system_metrics`)."""
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


@dataclass
class ChainResult:
    """A trained model and its samplers' records (`train_sample_evaluate`)."""

    train: TrainResult
    solves: list[SolveRecord]


def train_sample_evaluate(
    cfg: Config, solves: list[SampleConfig], ecfg: EvalConfig, samples_root: str | Path
) -> ChainResult:
    """Train per `cfg`, then `sample_and_evaluate` the final model. The manifest is read (and checked against the
    config) once."""
    manifest = check_data(cfg)
    for scfg in solves:  # a sampler the method cannot take is refused before training, not after it
        validate_sample_config(scfg, cfg.method.name)
    trained = run_training(cfg, manifest, callbacks=quality_callbacks(cfg, manifest))
    solved = sample_and_evaluate(
        trained.tracking_uri,
        trained.final_checkpoint,
        manifest,
        solves,
        ecfg,
        Path(samples_root) / trained.run_id,
        cfg.mlflow.system_metrics,
    )
    return ChainResult(trained, solved)


# --- sample quality while training -------------------------------------------------------------------------------


def quality_configs(cfg: Config) -> tuple[SampleConfig, EvalConfig]:
    """The sampling and evaluation settings of `train.eval_*`: those of `flowray sample --num-samples
    train.eval_samples --set sample.solver=... ` and `flowray evaluate --set eval.max_images=train.eval_rows`, one
    actor each. The stages share the cluster with the trainers: their actors run at a lower OS priority
    (`train.eval_nice`, the lowest by default), so that where they share a node the trainers keep their cores and
    the scores arrive later."""
    t = cfg.train
    return (
        SampleConfig(
            num_samples=t.eval_samples,
            solver=t.eval_solver,
            steps=t.eval_steps,
            actors=1,
            nice=t.eval_nice,
            resource=t.eval_resource,
        ),
        EvalConfig(max_images=t.eval_rows, actors=1, nice=t.eval_nice, resource=t.eval_resource),
    )


def quality_callbacks(cfg: Config, manifest: Manifest) -> list:
    """The Ray Train callbacks that score a training run's checkpoints while it trains (`train.eval_every`), checked
    before Ray starts; none when it is 0."""
    if not cfg.train.eval_every:
        return []
    scfg, ecfg = quality_configs(cfg)
    validate_sample_config(scfg, cfg.method.name)
    validate_eval_config(ecfg)
    manifest.check_split(ecfg.split, "train.eval_rows (the test split)")
    return [QualityWhileTraining(cfg, manifest, tracking_uri(cfg.mlflow.tracking_uri))]


def score_checkpoint(
    staged: str, filesystem, manifest: Manifest, scfg: SampleConfig, ecfg: EvalConfig, uri: str
) -> dict:
    """Sample and evaluate one checkpoint of a training run (`staged`: its copy in the run's storage, in
    `filesystem`; removed once read) and log the figures to the training run at the checkpoint's step, as
    `eval/...`. Returns them."""
    from ray.train import Checkpoint

    configure_ray_data("scoring")
    with tempfile.TemporaryDirectory(prefix="flowray-q-") as tmp:
        local = Checkpoint(staged, filesystem).to_directory(str(Path(tmp, "checkpoint")))
        filesystem.delete_dir(staged)
        meta = load_meta(local)
        samples = run_sampling(local, Path(tmp, "samples"), scfg)
        ev = run_evaluation(local, manifest, samples.out, ecfg)
    q, lik = ev.quality, ev.likelihood
    assert q is not None  # run_evaluation scores the samples it is given
    raw: dict[str, float | None] = {
        "eval/bpd": None if lik is None else lik.mean,
        "eval/sample_nfe": samples.mean_nfe,
        "eval/fd": q.fd,
        "eval/fd_floor": q.fd_floor,
        "eval/kid": q.kid,
        "eval/precision": q.precision,
        "eval/recall": q.recall,
    }
    if ev.straightness is not None:
        raw["eval/straightness"] = ev.straightness.straightness
    figures = {k: float(v) for k, v in raw.items() if v is not None and not math.isnan(v)}
    assert meta.mlflow_run_id is not None  # a training run's checkpoints name their MLflow run
    log = SafeLogger(uri, meta.mlflow_run_id)
    log.metrics(figures, meta.step)
    log.close(60.0)
    return {"step": meta.step, **figures}


class _Scorer:
    """One per training run: scores checkpoints one at a time, in order (a queue of calls on one Ray actor), so that
    scoring never takes more of the cluster than one sampling and one evaluation stage."""

    def score(self, *args) -> dict:
        return score_checkpoint(*args)


class QualityWhileTraining(UserCallback):
    """On the Ray Train controller: each registered checkpoint at a multiple of `train.eval_every` (and the last) is
    copied beside the run's checkpoints (Ray Train deletes old ones as new ones arrive) and queued on the run's
    scorer actor, off the step's critical path; at the last step the controller waits for every score, so that the
    run ends with all of them logged."""

    def __init__(self, cfg: Config, manifest: Manifest, uri: str):
        self.cfg, self.manifest, self.uri = cfg, manifest, uri
        self.scorer: Any = None  # the run's _Scorer actor, started with the first score
        self.pending: list = []

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        import posixpath

        import pyarrow.fs as pafs
        import ray

        if checkpoint is None or not metrics:
            return
        step, t = int(metrics[0]["step"]), self.cfg.train
        if step % t.eval_every == 0 or step == t.steps:
            if self.scorer is None:  # it waits on the stages it starts: almost no CPU of its own
                # (Ray's stubs type `ray.remote(...)` for functions only: an actor's max_concurrency is not in them)
                self.scorer = ray.remote(  # type: ignore[call-overload]
                    num_cpus=0.01, max_concurrency=1, **resource_args(t.eval_resource)
                )(_Scorer).remote()
            staged = posixpath.join(posixpath.dirname(checkpoint.path), ".quality", f"step_{step:09d}")
            checkpoint.filesystem.create_dir(staged)
            pafs.copy_files(
                checkpoint.path,
                staged,
                source_filesystem=checkpoint.filesystem,
                destination_filesystem=checkpoint.filesystem,
            )
            scfg, ecfg = quality_configs(self.cfg)
            self.pending.append(
                self.scorer.score.remote(staged, checkpoint.filesystem, self.manifest, scfg, ecfg, self.uri)
            )
        if step == t.steps:
            for ref in self.pending:  # one failed score is said, and the run goes on to finish
                try:
                    ray.get(ref)
                except Exception as err:
                    stage(f"sample quality while training: a checkpoint could not be scored: {err}")
            self.pending = []
            if self.scorer is not None:
                ray.kill(self.scorer)
                self.scorer = None
