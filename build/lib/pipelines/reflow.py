"""Rectified Flow's reflow (Liu, Gong and Liu 2022, "Flow Straight and Fast") as a chain of this project's stages.

A trained flow's own coupling is sampled at scale and becomes the next model's training data:

    round r:  sample N pairs from model r-1 (an ODE solver; the noise of sample i is regenerated from its seed, never
              stored)  ->  ingest them (`samples:DIR`: x_1 the sample, the manifest names the generating model)
              ->  train method `reflow` on the pairs (the straight path between them, target x_1 - x_0; warm-started
              from model r-1 unless from scratch)  ->  sample with every evaluation solver and evaluate on the real
              data (FD with its floor, bits/dim, straightness)

The pairs draw their noise from a seed of their own, which no evaluation sampler may share: every model is scored on
fresh noise, never on the x_0 it was trained on (`plan` refuses otherwise).

With `distill`, one more round distills the last reflowed model into a one-step map (Liu et al. Sec. 2.3): pairs
from that model, method `distill` (v(x_0, 0) regresses x_1 - x_0) warm-started from it, sampled in one jump with the
first evaluation sampler's seed and count, and put in the table beside the other models' one-step column.

k rounds give the model of reflow k; with a generating model trained on independent pairs (I-CFM, FM-OT: Liu et
al.'s 1-rectified flow) that is the (k+1)-rectified flow, while a generator trained on other pairs (OT-CFM's minibatch
OT couplings) has no place in that numbering, so the table names rounds "reflow k", never "k-rectified". The
chain is one MLflow run (`flowray.kind` reflow) with each round's training run nested under it (their sampling and
evaluation runs nested under those, as everywhere); with the baseline, the generating model is sampled and evaluated
with the same solvers first, so the table compares like with like. Every input is checked before Ray starts; a rerun
of the same command reuses what was finished (sampling redoes only its missing blocks, an ingested round is kept,
training resumes its run from its checkpoint) and evaluates again.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fm.methods import JUMP
from pipelines.batch.config import EvalConfig, SampleConfig, validate_eval_config, validate_sample_config
from pipelines.batch.sample import log_sampling_run, open_sampling_run, run_sampling
from pipelines.chain import SolveRecord, quality_callbacks, sample_and_evaluate, solver_tag
from pipelines.core import lease, storage
from pipelines.core.checkpoint import load_meta
from pipelines.core.errors import ConfigError
from pipelines.core.manifest import MANIFEST, Manifest
from pipelines.core.run_logger import SafeLogger
from pipelines.core.runtime import stage
from pipelines.core.settings import check
from pipelines.core.system_metrics import monitored_run
from pipelines.core.tracking import find_or_create_run, tracking_uri, ui_hint
from pipelines.ingest.run import ingest
from pipelines.train.against_data import check_data, check_init_from
from pipelines.train.config import Config, load_config
from pipelines.train.driver import run_training


@dataclass
class ReflowSpec:
    """What `flowray reflow` was asked."""

    checkpoint: str  # the generating model (a folder or object-store prefix; runs:/ and models:/ resolved)
    data: str  # the real data's shards: the models are evaluated on them
    num_pairs: int
    config: str | None = None  # the training config of every round (method.name is set to reflow)
    overrides: list[str] = field(default_factory=list)  # its --set section.key=value
    rounds: int = 1  # k reflows (the (k+1)-rectified flow when the generator was trained on independent pairs)
    warm_start: bool = True  # start round r from model r-1's weights; False: a random init
    pair_sampler: SampleConfig = field(default_factory=lambda: SampleConfig(solver="dopri5"))
    solves: list[SampleConfig] = field(default_factory=list)  # evaluation samplers (num_samples each)
    eval_config: EvalConfig = field(default_factory=EvalConfig)
    out: str = "outputs/reflow"
    name: str = "reflow"
    baseline: bool = True  # sample and evaluate the generating model with the same solvers first
    system_metrics: bool = True
    distill: bool = False  # one more round: the last model distilled into a one-step map (method distill)


@dataclass
class Plan:
    spec: ReflowSpec
    manifest: Manifest  # the real data
    configs: list[Config]  # round 1..k (k + 1: the distillation)
    uri: str
    pair_sampler: SampleConfig

    def solves(self, r: int) -> list[SampleConfig]:
        """Round r's evaluation samplers: the spec's, or for the distillation one jump with the first one's seed,
        count and block settings."""
        if not self.distilled(r):
            return self.spec.solves
        return [replace(s, solver=JUMP, steps=1) for s in self.spec.solves[:1]]

    def distilled(self, r: int) -> bool:
        return self.spec.distill and r == len(self.configs)


def round_dir(spec: ReflowSpec, r: int) -> str:
    return storage.join(spec.out, spec.name, f"round-{r}")


def plan(spec: ReflowSpec) -> Plan:
    """Every round's config and every sampler checked against the generating model and the real data, before Ray."""
    storage.check_name(spec.name, "--name")  # the chain's folder under --out
    check(spec.rounds >= 1, "--rounds", spec.rounds, "must be >= 1")
    check(spec.num_pairs >= 2, "--num-pairs", spec.num_pairs, "must be >= 2")
    try:
        meta = load_meta(spec.checkpoint)
    except ConfigError as err:
        raise ConfigError(f"--checkpoint: {err}") from None
    manifest = Manifest.load(spec.data, key="--data")
    trained_on = meta.data_shape
    if trained_on != manifest.data.shape:
        raise ConfigError(
            f"--checkpoint: the generating model was trained on rows of shape {trained_on}, but --data "
            f"{manifest.directory} holds {manifest.data.shape}"
        )
    pair_sampler = replace(spec.pair_sampler, num_samples=spec.num_pairs)
    validate_sample_config(pair_sampler, meta.method_name, meta.method)
    check(
        pair_sampler.solver != "sde",
        "sample.solver",
        "sde",
        "the pairs are an ODE's: (x_0, x_1 = ODE(x_0)); use dopri5 or a fixed-step ODE solver",
    )
    for s in spec.solves:
        validate_sample_config(s, "reflow")
        # sample i of seed s starts from the noise derive_seed(s, i): with the pairs' seed, the evaluation samples
        # would start from the x_0 of the reflowed model's own training pairs, and score it on what it was fit to
        check(
            s.seed != pair_sampler.seed,
            "--pair-seed",
            pair_sampler.seed,
            f"the evaluation samplers draw their noise from sample.seed={s.seed} too, so the reflowed models would "
            "be scored on the x_0 of their own training pairs; give the pairs a seed of their own",
        )
    validate_eval_config(spec.eval_config)
    configs = []
    for r in range(1, spec.rounds + 1 + spec.distill):
        # train.init_from is set when the round starts: round r > 1 warm-starts from round r - 1's final model
        forced = [
            "method.name=reflow",
            "data.hflip=false",
            f"data.shards={round_dir(spec, r)}/data",
            f"train.run_name={spec.name}-round{r}",
        ]
        if spec.distill and r == spec.rounds + 1:  # scored while training in one jump, like its evaluation
            forced += ["method.name=distill", f"train.run_name={spec.name}-distill"]
            forced += ["train.eval_solver=jump", "train.eval_steps=1"]
        configs.append(load_config(spec.config, [*spec.overrides, *forced]))
    for s in spec.solves[:1] if spec.distill else []:
        validate_sample_config(replace(s, solver=JUMP, steps=1), "distill")
    if spec.warm_start:  # the first round starts from the generating model: the config must build it
        check_init_from(replace(configs[0], train=replace(configs[0].train, init_from=spec.checkpoint)), manifest.data)
    cfg = configs[0]
    need = cfg.train.batch_size * cfg.ray.num_workers
    check(
        spec.num_pairs * 0.8 >= need,
        "--num-pairs",
        spec.num_pairs,
        f"the pairs' train split (about 90% of them) must fill a global batch of {need} (train.batch_size x "
        "ray.num_workers)",
    )
    quality_callbacks(cfg, manifest)  # train.eval_* checked against the real data
    return Plan(spec, manifest, configs, tracking_uri(cfg.mlflow.tracking_uri), pair_sampler)


def run_reflow(spec: ReflowSpec) -> dict:
    """Run (or continue) the chain; returns every round's pairs, training and evaluations, and the parent run."""
    p = plan(spec)
    with lease.acquire(storage.join(spec.out, spec.name), f"reflow chain {spec.name!r}", "--name"):
        return _reflow(p)


def _reflow(p: Plan) -> dict:
    spec = p.spec
    parent, resumed = find_or_create_run(
        p.uri,
        p.configs[0].mlflow.experiment,
        spec.name,
        {
            "flowray.kind": "reflow",
            "flowray.storage": storage.join(spec.out, spec.name),
            "mlflow.note.content": f"{spec.rounds} reflow round(s) of {spec.checkpoint}: {spec.num_pairs} pairs a "
            f"round ({p.pair_sampler.solver}), {'warm' if spec.warm_start else 'cold'} start",
        },
    )
    log = SafeLogger(p.uri, parent)
    if not resumed:
        log.params(
            {
                "reflow.checkpoint": spec.checkpoint,
                "reflow.num_pairs": spec.num_pairs,
                "reflow.rounds": spec.rounds,
                "reflow.warm_start": spec.warm_start,
                "reflow.distill": spec.distill,
                "reflow.pair_solver": p.pair_sampler.solver,
                "reflow.data": spec.data,
                "reflow.solvers": ",".join(solver_tag(s) for s in spec.solves),
            }
        )
    rounds: list[dict] = []
    baseline = None
    if spec.baseline and spec.solves:
        stage(f"reflow {spec.name}: the generating model with the evaluation solvers (the baseline)")
        baseline = sample_and_evaluate(
            p.uri,
            spec.checkpoint,
            p.manifest,
            spec.solves,
            spec.eval_config,
            storage.join(spec.out, spec.name, "round-0", "samples"),
            spec.system_metrics,
        )
    checkpoint = spec.checkpoint
    for r, cfg in enumerate(p.configs, start=1):
        rounds.append(_round(p, parent, r, cfg, checkpoint))
        checkpoint = rounds[-1]["train"].final_checkpoint
    table = reflow_markdown(baseline, rounds)
    print(table, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "reflow.md").write_text(table + "\n")
        log.artifact(Path(tmp, "reflow.md"))
        log.metrics(_figures(baseline, rounds), step=0)
        log.finish("FINISHED")
    stage(ui_hint(p.uri, parent))
    return {
        "parent_run_id": parent,
        "tracking_uri": p.uri,
        "experiment": p.configs[0].mlflow.experiment,
        "baseline": [s.to_dict() for s in baseline] if baseline else None,
        "rounds": rounds,
        "table": table,
    }


def _round(p: Plan, parent: str, r: int, cfg: Config, generator: str) -> dict:
    """One round: pairs from `generator`, ingested, trained on, sampled and evaluated."""
    spec, where = p.spec, round_dir(p.spec, r)
    what = "distillation" if p.distilled(r) else f"round {r}/{spec.rounds}"
    stage(f"reflow {spec.name} {what}: {spec.num_pairs} pairs from {generator}")
    start = time.perf_counter()
    run_id = open_sampling_run(p.uri, generator, asdict(p.pair_sampler))
    with monitored_run(p.uri, run_id, spec.system_metrics):
        pairs = run_sampling(generator, storage.join(where, "pairs"), p.pair_sampler)
    log_sampling_run(pairs, asdict(p.pair_sampler), p.uri, run_id)
    data = storage.join(where, "data")
    if not storage.is_file(storage.join(data, MANIFEST)):  # a rerun keeps a round already ingested
        conditional = bool(load_meta(generator).model_kwargs.get("num_classes"))
        ingest(f"samples:{pairs.out}", data, unlabelled=not conditional)
    pairs_s = time.perf_counter() - start
    if spec.warm_start or p.distilled(r):  # the distillation always starts from the model it distills
        cfg = replace(cfg, train=replace(cfg.train, init_from=generator))
    manifest = check_data(cfg)
    trained = run_training(
        cfg,
        manifest,
        tags={
            "mlflow.parentRunId": parent,
            "flowray.reflow": parent,
            "flowray.reflow.round": "distill" if p.distilled(r) else str(r),
        },
        callbacks=quality_callbacks(cfg, p.manifest),
    )
    solves = (
        sample_and_evaluate(
            p.uri,
            trained.final_checkpoint,
            p.manifest,
            p.solves(r),
            spec.eval_config,
            storage.join(where, "samples"),
            spec.system_metrics,
        )
        if spec.solves
        else []
    )
    return {
        "round": r,
        "distilled": p.distilled(r),
        "generator": generator,
        "pairs": pairs.to_dict(),
        "pairs_and_ingest_s": round(pairs_s, 1),
        "data": data,
        "train": trained,
        "solves": [s.to_dict() for s in solves],
        "records": solves,
    }


def _fd(rec: SolveRecord) -> str:
    q = rec.evaluation.quality
    return f"{q.fd:.3f}" if q is not None and q.fd is not None else "–"


def _row(label: str, records: list[SolveRecord]) -> str:
    cells = [_fd(rec) for rec in records]
    ev = records[0].evaluation if records else None
    st = ev.straightness if ev is not None else None
    bpd = ev.likelihood.mean if ev is not None and ev.likelihood is not None else None
    nfe = records[-1].sample.mean_nfe if records else None
    return (
        f"| {label} | " + " | ".join(cells) + f" | {'' if nfe is None else f'{nfe:.0f}'} | "
        f"{'' if st is None else f'{st.straightness:.4g}'} | {'' if bpd is None else f'{bpd:.3f}'} |"
    )


def reflow_markdown(baseline: list[SolveRecord] | None, rounds: list[dict]) -> str:
    """FD (with the floor) at every evaluation solver, the last solver's NFE, straightness and bits/dim, for the
    generating model and each round."""
    records = baseline or (rounds[0]["records"] if rounds else [])
    if not records:
        return "(no evaluation solvers: nothing to compare)"
    label = records[0].evaluation.quality.fd_label if records[0].evaluation.quality else "FD"
    floor = records[0].evaluation.quality.fd_floor if records[0].evaluation.quality else None
    head = (
        "| model | "
        + " | ".join(f"{label} {r.solver}" for r in records)
        + f" | NFE ({records[-1].solver}) | straightness | bits/dim |"
    )
    lines = [head, "|" + " --- |" * (len(records) + 4)]
    if baseline:
        lines.append(_row("generating model", baseline))
    lines += [_row(f"reflow {r['round']}", r["records"]) for r in rounds if not r.get("distilled")]
    for r in rounds:
        if r.get("distilled") and r["records"]:
            # one network call: its FD goes in the columns of the samplers that call the network once
            (jump,) = r["records"]
            cells = [_fd(jump) if rec.sample.mean_nfe == 1 else "–" for rec in records]
            lines.append("| distilled (1 jump) | " + " | ".join(cells) + " | 1 |  |  |")
    if floor is not None:
        lines.append(f"\n{label} floor (held-out real images against the reference): {floor:.3f}")
    if any(r.get("distilled") for r in rounds):
        lines.append(
            "The distilled model is sampled in one jump x_0 + v(x_0, 0) (one network call, like one Euler step); "
            "it has no velocity field, so no straightness or bits/dim."
        )
    return "\n".join(lines)


def _figures(baseline: list[SolveRecord] | None, rounds: list[dict]) -> dict[str, float]:
    """The parent run's metrics: fd_<solver>_r<k> (r0: the generating model), straightness_r<k>, and the pairs'
    sampling rate and wall time of each round."""
    out: dict[str, float] = {}
    for k, records in [(0, baseline or [])] + [(r["round"], r["records"]) for r in rounds]:
        for rec in records:
            q = rec.evaluation.quality
            if q is not None and q.fd is not None:
                out[f"fd_{rec.solver}_r{k}"] = float(q.fd)  # the distillation's: fd_jump1_r<k+1>
        if records and records[0].evaluation.straightness is not None:
            out[f"straightness_r{k}"] = records[0].evaluation.straightness.straightness
    for r in rounds:
        out[f"pairs_wall_s_r{r['round']}"] = r["pairs_and_ingest_s"]
        if r["pairs"].get("samples_per_s") is not None:
            out[f"pairs_samples_per_s_r{r['round']}"] = float(r["pairs"]["samples_per_s"])
    return out


def solves_from(text: str, num_samples: int, overrides: dict | None = None) -> list[SampleConfig]:
    """`euler:1,euler:2,dopri5` -> the evaluation samplers, num_samples each."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        solver, _, steps = item.partition(":")
        try:
            kwargs: dict[str, Any] = {"steps": int(steps)} if steps else {}
        except ValueError:
            raise ConfigError(f"--solvers: {item!r}: steps must be an integer (SOLVER or SOLVER:STEPS)") from None
        out.append(SampleConfig(num_samples=num_samples, solver=solver, **kwargs, **(overrides or {})))
    return out
