"""Sweeps on Ray Tune: one Ray Train run per trial (the pattern Ray documents for Train V2: a Tune function trainable
starts a `TorchTrainer` and Ray Train's controller reports each checkpoint's metrics to Tune), each trial an MLflow
run nested under the sweep's run, which ends with the trials' table and learning curves.

    trials = the grid of --param values x --seeds, each validated as a full training config before Ray starts
    Tuner(grid, max_concurrent_trials, scheduler: FIFO or ASHA on val_loss / loss at each checkpoint's step)
      └─ trial: run_training(config, tags = nested under the sweep's run, callbacks = [report to Tune])

A sweep lives under `train.storage_path/NAME`: Tune's experiment state in `tune/`, the trials' Ray Train runs in
`runs/`, the trial list in `sweep.json`. The same command again restores it with Tune's own restore: finished trials
are kept, unfinished ones continue (their Ray Train runs resume from their last checkpoint and log to the same MLflow
runs, as any resumed training run does). An early-stopped trial's MLflow run ends KILLED, tagged with the step it
was stopped at.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.chain import quality_callbacks
from pipelines.compare import plot_curves, sweep_markdown, sweep_trials
from pipelines.core import lease, storage
from pipelines.core.errors import ConfigError, JobStopped
from pipelines.core.figures import write_csv
from pipelines.core.run_logger import SafeLogger
from pipelines.core.runtime import init_ray, interruptible, stage
from pipelines.core.settings import check
from pipelines.core.tracking import check_tracking_uri, find_or_create_run, find_run, source_tags, tracking_uri, ui_hint
from pipelines.train.against_data import check_data
from pipelines.train.config import Config, load_config
from pipelines.train.driver import run_training

SCHEDULERS = ("fifo", "asha")
METRICS = ("val_loss", "loss")  # what every checkpoint's report holds (val_loss when train.val_rows > 0)
SET_BY_SWEEP = ("train.seed", "train.run_name", "train.storage_path", "mlflow.experiment", "mlflow.tracking_uri")
TRIAL_CPUS = 0.05  # a trial's own actor only waits on its Ray Train run, whose workers hold the CPUs


@dataclass
class SweepSpec:
    """A sweep: a base config (`config` + `overrides`), the grid `space` (key -> values as `--set` takes them),
    the seeds of every point, and how Tune schedules the trials."""

    name: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    space: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    scheduler: str = "fifo"
    metric: str = "val_loss"
    mode: str = "min"
    max_concurrent: int = 2
    grace_steps: int | None = None  # ASHA: steps every trial trains before it may be stopped (default: 1st checkpoint)
    reduction_factor: int = 2  # ASHA: the fraction 1 / reduction_factor of trials goes on at each rung


@dataclass(frozen=True)
class Trial:
    """One point of the grid with one seed: its training run's name, the swept values and the seed."""

    name: str
    values: dict[str, str]
    seed: int

    def sets(self) -> list[str]:
        return [*(f"{k}={v}" for k, v in self.values.items()), f"train.seed={self.seed}", f"train.run_name={self.name}"]


def parse_param(text: str) -> tuple[str, list[str]]:
    """`section.key=v1,v2,...` (a `--param` flag) -> (key, values)."""
    key, sep, values = text.partition("=")
    parts = [v.strip() for v in values.split(",")]
    if not sep or "." not in key or not all(parts):
        raise ConfigError(f"--param {text!r}: expected section.key=value1,value2,... (e.g. optim.lr=1e-3,5e-4)")
    return key.strip(), parts


def load_space(path: str) -> tuple[dict[str, list[str]], list[int] | None]:
    """A YAML search space: `params: {section.key: [values]}` and optionally `seeds: [..]`."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--space {path}: {err}") from None
    params = raw.get("params") if isinstance(raw, dict) else None
    if not isinstance(params, dict) or not params or not all(isinstance(v, list) and v for v in params.values()):
        raise ConfigError(f"--space {path}: expected 'params:' mapping section.key to a non-empty list of values")
    unknown = set(raw) - {"params", "seeds"}
    if unknown:
        raise ConfigError(f"--space {path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: params, seeds")
    seeds = raw.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"--space {path}: 'seeds' must be a non-empty list of integers, not {seeds!r}")
    return {str(k): [_plain(v) for v in vs] for k, vs in params.items()}, seeds


def _plain(value) -> str:
    """A YAML value as `--set` takes it (lists as YAML flow sequences)."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def trials(spec: SweepSpec) -> list[Trial]:
    """The grid in order: the first key varies slowest, seeds fastest."""
    keys = list(spec.space)
    out = []
    for combo in itertools.product(*(spec.space[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        label = "-".join(f"{k}={v}" for k, v in values.items())
        for seed in spec.seeds:
            name = f"{spec.name}-{label}-s{seed}" if label else f"{spec.name}-s{seed}"
            out.append(Trial(name.replace("/", "_").replace(" ", ""), values, seed))
    return out


@dataclass
class Plan:
    """What the sweep runs, resolved and validated before Ray starts."""

    spec: SweepSpec
    base: Config
    uri: str
    root: str  # train.storage_path/NAME
    sets: list[str]  # the overrides every trial shares (the user's, then the sweep's own)
    trials: list[Trial]
    configs: dict[str, Config]  # each trial's full training config, by its name
    steps: int


def plan(spec: SweepSpec) -> Plan:
    """Check the sweep's settings, and every trial's full config against the data, before any Ray work."""
    storage.check_name(spec.name, "--name")  # the sweep's folder under train.storage_path
    check(spec.scheduler in SCHEDULERS, "--scheduler", spec.scheduler, f"allowed: {', '.join(SCHEDULERS)}")
    check(spec.metric in METRICS, "--metric", spec.metric, f"allowed: {', '.join(METRICS)}")
    check(spec.mode in ("min", "max"), "--mode", spec.mode, "allowed: min, max")
    check(spec.max_concurrent >= 1, "--max-concurrent", spec.max_concurrent, "must be >= 1")
    check(spec.reduction_factor >= 2, "--reduction-factor", spec.reduction_factor, "must be >= 2")
    check(
        len(set(spec.seeds)) == len(spec.seeds) and bool(spec.seeds), "--seeds", spec.seeds, "must be distinct integers"
    )
    for key in spec.space:
        check(
            key not in SET_BY_SWEEP,
            "--param",
            key,
            f"is set by the sweep for every trial ({', '.join(SET_BY_SWEEP)}); use --seeds for seeds",
        )
        # the ranked losses are the method's own: its path, coupling, time density and target define them
        check(
            not key.startswith("method."),
            "--param",
            key,
            f"the sweep ranks its trials on {spec.metric}, which each trial computes under its own method.* "
            "settings (path, coupling, time density, target), so trials that differ in one would be ranked on "
            "different losses; sweep one method setting at a time, and compare methods on FD and bits/dim "
            "(`flowray reproduce`, `flowray compare`)",
        )
    names = [t.name for t in trials(spec)]
    twice = sorted({n for n in names if names.count(n) > 1})
    check(
        not twice,
        "--param",
        " ".join(f"{k}={','.join(v)}" for k, v in spec.space.items()),
        f"repeats a value: trials {', '.join(twice)} would be one run trained twice at once; give each value once",
    )
    base = load_config(spec.config, spec.overrides)
    uri = tracking_uri(base.mlflow.tracking_uri)
    check_tracking_uri(uri)
    root = storage.join(storage.check_writable(base.train.storage_path, "train.storage_path"), spec.name)
    # absolute locations: a trial runs in a Tune actor, whose working directory is not the caller's
    shards = base.data.shards if storage.is_uri(base.data.shards) else str(Path(base.data.shards).resolve())
    sets = [
        *spec.overrides,
        f"data.shards={shards}",
        f"train.storage_path={storage.join(root, 'runs')}",
        f"mlflow.tracking_uri={uri}",
    ]
    if spec.metric == "val_loss" and base.train.val_rows == 0:
        sets.append("train.val_rows=256")  # the fixed held-out set the scheduler compares trials on
    grid = trials(spec)
    steps, configs = None, {}
    for trial in grid:
        try:
            cfg = configs[trial.name] = load_config(spec.config, [*sets, *trial.sets()])
            quality_callbacks(cfg, check_data(cfg))  # train.eval_* checked here too
        except ConfigError as err:
            raise ConfigError(f"trial {trial.name}: {err}") from None
        if steps is not None and cfg.train.steps != steps:
            raise ConfigError(
                f"--param train.steps: every trial of a sweep trains the same steps (the scheduler "
                f"compares them at the same step); got {steps} and {cfg.train.steps}"
            )
        steps = cfg.train.steps
    steps = base.train.steps if steps is None else steps
    if spec.scheduler == "asha":
        grace = spec.grace_steps or base.train.checkpoint_every
        check(1 <= grace < steps, "--grace-steps", grace, f"must be in [1, train.steps={steps})")
    return Plan(spec, base, uri, root, sets, grid, configs, base.train.steps if steps is None else steps)


def run_sweep(spec: SweepSpec) -> dict:
    """Run (or resume) the sweep; returns its parent run id, the trials' table and where it was logged."""
    p = plan(spec)
    with lease.acquire(p.root, f"sweep {spec.name!r}", "--name"):  # one driver per sweep
        return _sweep(p)


def _sweep(p: Plan) -> dict:
    spec = p.spec
    _check_same_sweep(p)
    parent, resumed = find_or_create_run(
        p.uri,
        p.base.mlflow.experiment,
        spec.name,
        {
            "flowray.kind": "sweep",
            "flowray.storage": p.root,
            "mlflow.note.content": f"sweep of {len(p.trials)} trials over {', '.join(spec.space) or 'seeds'} "
            f"({spec.scheduler}, {spec.metric} {spec.mode})",
        },
    )
    if not resumed:
        log = SafeLogger(p.uri, parent)
        log.params(
            {
                "sweep.space": json.dumps(spec.space),
                "sweep.seeds": ",".join(map(str, spec.seeds)),
                "sweep.scheduler": spec.scheduler,
                "sweep.metric": spec.metric,
                "sweep.mode": spec.mode,
                "sweep.max_concurrent": spec.max_concurrent,
                "sweep.trials": len(p.trials),
                "sweep.config": spec.config or "",
                "sweep.overrides": " ".join(spec.overrides),
            }
        )
        log.close()
    cfg = p.base
    per_trial = math.ceil(cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1)  # its workers, and its stream's reads
    init_ray(cfg.ray.address, max(cfg.ray.local_cpus, spec.max_concurrent * per_trial + 1))
    tuner = _tuner(p, parent)
    stage(
        f"sweep {spec.name}: {len(p.trials)} trials, {spec.max_concurrent} at a time, {spec.scheduler} on "
        f"{spec.metric} ({'resumed' if resumed else 'new'} MLflow run {parent}, experiment {cfg.mlflow.experiment})"
    )
    try:
        grid = interruptible(tuner.fit)
    except JobStopped as stop:
        SafeLogger(p.uri, parent).finish("KILLED")
        stop.kept = f"the sweep's finished trials are kept in {p.root}; rerun the command to resume it"
        raise
    import ray

    ray.shutdown()  # a local Ray stops here, flushing the trials' deduplicated log lines before the table
    statuses = _close_trial_runs(p, grid)
    return _finish(p, parent, statuses)


def _check_same_sweep(p: Plan) -> None:
    """A sweep resumed under the same name must be the same sweep: its trials, scheduler and metric."""
    record = storage.join(p.root, "sweep.json")
    spec = p.spec
    mine = {
        "trials": [asdict(t) for t in p.trials],
        "scheduler": spec.scheduler,
        "metric": spec.metric,
        "mode": spec.mode,
        "sets": p.sets,
    }
    if storage.exists(record, "train.storage_path"):
        theirs = json.loads(storage.read_text(record, "train.storage_path"))
        if theirs != mine:
            diff = [k for k in mine if theirs.get(k) != mine[k]]
            raise ConfigError(
                f"sweep {spec.name} at {p.root} was started with other {', '.join(diff)}; rerun it "
                "with the same flags to resume it, or give a new --name"
            )
    else:
        storage.write_text(record, json.dumps(mine, indent=1), "train.storage_path")


def _tuner(p: Plan, parent: str):
    """A new Tuner over the grid, or the one in `root/tune` restored (finished trials kept, the others resumed)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, configs=p.configs, parent=parent, source=source_tags()), {"cpu": TRIAL_CPUS}
    )
    tune_dir = storage.join(p.root, "tune")
    if tune.Tuner.can_restore(tune_dir):
        stage(f"restoring sweep {p.spec.name} from {tune_dir}")
        return tune.Tuner.restore(
            tune_dir, trainable, resume_unfinished=True, resume_errored=True, **_filesystem(tune_dir)
        )
    spec = p.spec
    scheduler: FIFOScheduler | ASHAScheduler
    if spec.scheduler == "asha":
        # max_t past the last step: ASHA stops a trial that reaches max_t; a trial ends by itself at train.steps
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=p.steps + 1,
            grace_period=spec.grace_steps or p.base.train.checkpoint_every,
            reduction_factor=spec.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([asdict(t) for t in p.trials])},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            scheduler=scheduler,
            max_concurrent_trials=spec.max_concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name="tune",
            **storage.ray_storage(p.root, "train.storage_path"),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


def _filesystem(location: str) -> dict:
    """Tuner.restore's file system argument for an object-store location."""
    args = storage.ray_storage(location, "train.storage_path")
    return {"storage_filesystem": args["storage_filesystem"]} if "storage_filesystem" in args else {}


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _run_trial(config: dict, configs: dict[str, Config], parent: str, source: dict[str, str]) -> None:
    """A Tune trial: one Ray Train run of the trial's config (resolved by the sweep's driver), nested under the sweep's
    MLflow run, whose controller sends each checkpoint's metrics to Tune. `source`: the driver's source tags (the
    sweep's command, user and commit; this process is a Ray worker)."""
    trial = Trial(**config["trial"])
    cfg = configs[trial.name]
    tags = {
        **source,
        "mlflow.parentRunId": parent,
        "flowray.sweep": parent,
        "flowray.sweep.values": json.dumps(trial.values),
        "flowray.sweep.seed": str(trial.seed),
    }
    manifest = check_data(cfg)
    # sample quality while training (train.eval_every) before the report to Tune, which may end the trial on any
    # report: each checkpoint's metrics reach MLflow first
    result = run_training(
        cfg,
        manifest,
        tags=tags,
        callbacks=[*quality_callbacks(cfg, manifest), _report_to_tune(cfg.train.steps)],
        drain_s=30.0,
    )
    # the last step's report goes to Tune only now that the run has ended (its model logged, its MLflow run
    # FINISHED): a scheduler that stopped the trial on that report would have cut the run's end off. A restored
    # sweep whose state missed this trial's end gets it the same way.
    from ray import tune

    tune.report({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})


def _report_to_tune(steps: int):
    """Ray Tune's report callback for a Train run, sending only the scalar metrics (not rank 0's MLflow windows), and
    every checkpoint's but the last step's (`_run_trial` reports that one once the run has ended)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScalarReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or metrics[0].get("step") == steps:
                return
            scalars = [
                {k: v for k, v in m.items() if not k.startswith("_") and isinstance(v, (int, float))} for m in metrics
            ]
            super().after_report(run_context, scalars, checkpoint)

    return ScalarReport()


def _close_trial_runs(p: Plan, grid) -> dict[str, str]:
    """Each trial's outcome (finished / stopped at step N / failed), tagged on its MLflow run; a stopped trial's run
    ends KILLED, a failed one's FAILED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(p.uri)
    statuses = {}
    for result in grid:
        name = result.config["trial"]["name"]
        step = int((result.metrics or {}).get("step", 0))
        if result.error is not None:
            status = "failed"
        elif step < p.steps:
            status = f"stopped at step {step}"
        else:
            status = "finished"
        statuses[name] = status
        run = find_run(p.uri, p.base.mlflow.experiment, name, storage.join(p.root, "runs", name))
        if run is None:
            continue
        client.set_tag(run.info.run_id, "flowray.sweep.status", status)
        # Tune ends a stopped trial's actor while its Ray Train run is mid-step: the run is left RUNNING, or, when
        # the trainer saw its controller go first, ended FAILED by the trial itself. The sweep knows it was a stop.
        end = "KILLED" if status.startswith("stopped") else "FAILED"
        if status != "finished" and run.info.status not in ("FINISHED", end):
            client.set_terminated(run.info.run_id, end)
    return statuses


def _finish(p: Plan, parent: str, statuses: dict[str, str]) -> dict:
    """The trials' table (markdown and CSV) and learning curves, logged to the sweep's run, which then ends."""
    spec = p.spec
    rows = sweep_trials(p.uri, parent, spec.metric, spec.mode)
    md = sweep_markdown(rows)
    print(md, flush=True)
    log = SafeLogger(p.uri, parent)
    with tempfile.TemporaryDirectory() as tmp:
        files = [write_csv(rows, Path(tmp, "trials.csv"))] if rows else []
        Path(tmp, "trials.md").write_text(md + "\n")
        files.append(Path(tmp, "trials.md"))
        curve = plot_curves(p.uri, rows, spec.metric, Path(tmp, f"{spec.metric}-vs-step.png"))
        if curve:
            files.append(curve)
        for f in files:
            log.artifact(f)
        best = rows[0] if rows else None
        if best and best.get(f"best_{spec.metric}") is not None:
            log.metrics({f"best_{spec.metric}": best[f"best_{spec.metric}"]}, int(best["steps"]))
            log.tags({"flowray.sweep.best_trial": best["trial"]})
        failed = sum(s == "failed" for s in statuses.values())
        log.finish("FAILED" if statuses and failed == len(statuses) else "FINISHED")
    stage(
        f"sweep {spec.name}: {sum(s == 'finished' for s in statuses.values())} finished, "
        f"{sum(s.startswith('stopped') for s in statuses.values())} stopped early, {failed} failed"
    )
    stage(ui_hint(p.uri, parent))
    return {
        "sweep": spec.name,
        "parent_run_id": parent,
        "experiment": p.base.mlflow.experiment,
        "tracking_uri": p.uri,
        "storage": p.root,
        "trials": rows,
        "statuses": statuses,
        "table": f"runs:/{parent}/trials.md",
    }
