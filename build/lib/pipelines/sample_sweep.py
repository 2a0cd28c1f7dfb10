"""A sampling sweep: which sampler to use after training, chosen by quality against cost.

    points = models (checkpoints, or EMA lengths rebuilt post hoc) x samplers (solver x steps x time grid, adaptive
             solvers x tolerances) x CFG scales, each validated against its model before Ray starts
    for each point: sample (the batch stage's actor pool) -> sample quality (the feature stage; the reference
                    statistics are cached next to the shards, so every point shares them) -> its MLflow run,
                    nested under the sweep's
    the sweep's run: every point's quality against its network evaluations per sample, the Pareto front (plot and
                     table), and the best point at each NFE budget (optionally tagged on a registered model version)

A sweep lives in OUT/NAME: `sweep.json` (its points and settings), `points/<point>/` (samples, and `point.json` once
scored), `ema/` (the rebuilt EMA checkpoints). The same command again skips the scored points, finishes a point's
missing sample blocks, and logs to the same MLflow runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fm.methods import JUMP
from fm.solvers import ADAPTIVE_METHODS, FIXED_METHODS, GRIDS, is_adaptive
from pipelines.batch.config import SCHEDULING, EvalConfig, SampleConfig, validate_eval_config, validate_sample_config
from pipelines.batch.quality import sample_quality
from pipelines.batch.sample import run_sampling
from pipelines.chain import solver_tag
from pipelines.core import lease, storage
from pipelines.core.checkpoint import load_meta
from pipelines.core.errors import ConfigError, JobStopped
from pipelines.core.manifest import Manifest
from pipelines.core.run_logger import SafeLogger
from pipelines.core.runtime import stage
from pipelines.core.samples import mean_nfe
from pipelines.core.settings import apply_overrides


@dataclass
class SampleSweepSpec:
    """What to sweep: the models (`checkpoints` as label -> checkpoint folder, plus the EMA lengths `sigma_rels`
    rebuilt from the run folder `ema_run`) and the samplers (each solver at every `steps` and `grids`, adaptive ones
    at every `tolerances`), at every `cfg_scales`; `sample_sets` / `eval_sets` are the points' shared `--set`s."""

    name: str
    data: str
    checkpoints: dict[str, str] = field(default_factory=dict)
    ema_run: str | None = None
    sigma_rels: list[float] = field(default_factory=list)
    solvers: list[str] = field(default_factory=lambda: ["euler", "heun2", "dopri5"])
    steps: list[int] = field(default_factory=lambda: [2, 4, 8])
    grids: list[str] = field(default_factory=lambda: ["uniform"])
    tolerances: list[float] = field(default_factory=lambda: [1e-3, 1e-5])
    cfg_scales: list[float] = field(default_factory=lambda: [1.0])
    budgets: list[int] = field(default_factory=list)  # NFE budgets of the best-per-budget table (default: 1, 2, 4..)
    out: str = "outputs/sample_sweeps"
    sample_sets: list[str] = field(default_factory=list)
    eval_sets: list[str] = field(default_factory=list)
    tag_version: str | None = None  # models:/NAME/VERSION to tag with the best setting per budget
    uri: str | None = None  # MLflow tracking URI; None: log nothing


@dataclass(frozen=True)
class Point:
    """One model with one sampler: its name (a folder and an MLflow run name), the model's label and checkpoint."""

    name: str
    model: str
    checkpoint: str
    sample: SampleConfig

    @property
    def setting(self) -> str:
        """The sampler in words, as the tables and the registry tags give it: "heun2, 4 steps, edm grid"."""
        s = self.sample
        if is_adaptive(s.solver):
            text = f"{s.solver}, tol {s.atol:g}"
        else:
            text = f"{s.solver}, {s.steps} step{'s' if s.steps > 1 else ''}"
            text += f", {s.time_grid} grid" if s.time_grid != "uniform" else ""
        return text + (f", CFG {s.cfg_scale:g}" if s.cfg_scale != 1.0 else "")


@dataclass
class PointResult:
    """A scored point: its network evaluations per sample, its quality (FD, FID or W2, lower is better) with the
    floor and the matched-count figure where the data has them, and the seconds the point took."""

    name: str
    model: str
    setting: str
    solver: str
    steps: int | None
    time_grid: str
    tolerance: float | None
    cfg_scale: float
    nfe: float  # network evaluations per sample (a guided evaluation counts twice: it runs the model on 2 B rows)
    metric: str
    value: float
    floor: float | None
    matched: float | None
    num_samples: int
    seconds: float
    mlflow_run_id: str | None = None
    floor_count: int | None = None  # the held-out images of the floor (and of `matched`)


@dataclass
class Plan:
    """The sweep resolved and checked before Ray starts."""

    spec: SampleSweepSpec
    root: str
    manifest: Manifest
    ecfg: EvalConfig
    points: list[Point]
    train_run_id: str | None  # the training run every model comes from, when they share one


def expand(spec: SampleSweepSpec, models: dict[str, str], base: SampleConfig) -> list[Point]:
    """Every model x sampler x CFG scale, in that order; each point checked against its model's method. One step
    is the same on every time grid, so a one-step point is made once, on the uniform grid."""
    samplers: list[SampleConfig] = []
    for solver in spec.solvers:
        if solver in ADAPTIVE_METHODS:
            samplers += [replace(base, solver=solver, atol=tol, rtol=tol) for tol in spec.tolerances]
        elif solver in (*FIXED_METHODS, JUMP):
            for steps in spec.steps:
                grids = spec.grids if steps > 1 else ["uniform"]
                samplers += [replace(base, solver=solver, steps=steps, time_grid=g) for g in grids]
        elif solver == "sde":
            samplers += [replace(base, solver=solver, steps=steps) for steps in spec.steps]
        else:
            allowed = ", ".join((*ADAPTIVE_METHODS, *FIXED_METHODS, JUMP, "sde"))
            raise ConfigError(f"--solvers: {solver!r} is not allowed; allowed: {allowed}")
    points = []
    for model, ckpt in models.items():
        meta = load_meta(ckpt)
        conditional = bool(meta.model_kwargs.get("num_classes"))
        for scfg in samplers:
            for scale in spec.cfg_scales:
                if scale != 1.0 and not conditional:
                    raise ConfigError(
                        f"--cfg-scales: {scale:g} is not allowed for model {model} ({ckpt}): it is unconditional, "
                        "and classifier-free guidance needs a model trained with class labels; use 1"
                    )
                s = replace(scfg, cfg_scale=scale)
                tag = solver_tag(s) + (f"-tol{s.atol:g}" if is_adaptive(s.solver) else "")
                tag += f"-cfg{scale:g}" if scale != 1.0 else ""
                try:
                    validate_sample_config(s, meta.method_name, meta.method)
                except ConfigError as err:
                    raise ConfigError(f"point {model}-{tag} (method {meta.method_name}): {err}") from None
                points.append(Point(f"{model}-{tag}", model, ckpt, s))
    return points


def plan(spec: SampleSweepSpec) -> Plan:
    """Check every flag and every point against its model, rebuild the EMA lengths asked for, before Ray starts."""
    storage.check_name(spec.name, "--name")
    if not spec.checkpoints and not spec.sigma_rels:
        raise ConfigError("give the models to sweep: --checkpoint (one or more), or --ema-run with --sigma-rel")
    if bool(spec.ema_run) != bool(spec.sigma_rels):
        raise ConfigError("--ema-run and --sigma-rel go together: the run whose EMA snapshots rebuild each length")
    for label in spec.checkpoints:
        storage.check_name(label, "--checkpoint (its LABEL=)", also="=")
    for key, counts in (("--steps", spec.steps), ("--budgets", spec.budgets)):
        if any(v < 1 for v in counts):
            raise ConfigError(f"{key}: {min(counts)} is not allowed; each must be >= 1")
    for key, numbers in (("--tolerances", spec.tolerances), ("--cfg-scales", spec.cfg_scales)):
        if any(not v > 0 for v in numbers):
            raise ConfigError(f"{key}: {min(numbers):g} is not allowed; each must be > 0")
    for g in spec.grids:
        if g not in GRIDS:
            raise ConfigError(f"--grids: {g!r} is not allowed; allowed: {', '.join(GRIDS)}")
    for key, given in (("--solvers", spec.solvers), ("--steps", spec.steps), ("--grids", spec.grids)):
        if len(set(given)) != len(given):
            raise ConfigError(f"{key}: {','.join(map(str, given))} repeats a value; give each once")
    base = SampleConfig(num_samples=1000)
    apply_overrides(base, "sample", spec.sample_sets)
    for key in ("solver", "steps", "atol", "rtol", "time_grid", "cfg_scale"):
        if any(s.split("=", 1)[0].strip() == f"sample.{key}" for s in spec.sample_sets):
            raise ConfigError(f"--set sample.{key}: the sweep sets it for each point; use the sweep's own flags")
    validate_sample_config(base)
    ecfg = EvalConfig()
    apply_overrides(ecfg, "eval", spec.eval_sets)
    validate_eval_config(ecfg)
    manifest = Manifest.load(spec.data)
    root = storage.join(storage.check_writable(spec.out, "--out"), spec.name)
    models = dict(spec.checkpoints)
    if spec.sigma_rels:
        models.update(_rebuilt(spec, root))
    points = expand(spec, models, base)
    names = [p.name for p in points]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"points {', '.join(twice)} would be made twice; give each model and sampler once")
    runs = {load_meta(ckpt).mlflow_run_id for ckpt in models.values()}
    return Plan(spec, root, manifest, ecfg, points, runs.pop() if len(runs) == 1 else None)


def _rebuilt(spec: SampleSweepSpec, root: str) -> dict[str, str]:
    """The EMA lengths `spec.sigma_rels`, rebuilt from the run's snapshots into the sweep's `ema/` folder (EDM2's
    least squares, `flowray ema`'s function): label `ema-<sigma_rel>` -> checkpoint."""
    from pipelines.train.posthoc_ema import rebuild

    assert spec.ema_run is not None  # (plan: --ema-run comes with --sigma-rel)
    rebuilt = rebuild(spec.ema_run, spec.sigma_rels, None, storage.join(root, "ema"))
    for r in rebuilt:
        stage(f"EMA sigma_rel {r.sigma_rel:g} at step {r.step} from {r.snapshots} snapshots: {r.checkpoint}")
    return {f"ema-{r.sigma_rel:g}": r.checkpoint for r in rebuilt}


def run_sample_sweep(spec: SampleSweepSpec) -> dict:
    """Run (or resume) the sweep; returns every point's result, the front, the best point per budget, and the
    sweep's MLflow run."""
    p = plan(spec)
    with lease.acquire(p.root, f"sample sweep {spec.name!r}", "--name"):  # one driver per sweep
        return _sweep(p)


def _check_same_sweep(p: Plan) -> None:
    """A sweep resumed under the same name must be the same sweep: its points and the settings they share."""
    record = storage.join(p.root, "sweep.json")
    mine: dict[str, Any] = {
        "data": p.manifest.directory,
        "points": [{**asdict(pt.sample), "name": pt.name, "checkpoint": pt.checkpoint} for pt in p.points],
        "eval": {k: v for k, v in asdict(p.ecfg).items() if k not in SCHEDULING},
    }
    for pt in mine["points"]:
        for key in SCHEDULING:
            pt.pop(key, None)
    if storage.is_file(record, "--out"):
        theirs = json.loads(storage.read_text(record, "--out"))
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise ConfigError(
                f"sample sweep {p.spec.name} at {p.root} was started with other {', '.join(diff)}; rerun it with "
                "the same flags to resume it, or give a new --name"
            )
    else:
        storage.write_text(record, json.dumps(mine, indent=1), "--out")


def _sweep(p: Plan) -> dict:
    spec = p.spec
    _check_same_sweep(p)
    sweep_run, experiment = _sweep_run(p) if spec.uri else (None, "")
    stage(
        f"sample sweep {spec.name}: {len(p.points)} points over {len({pt.model for pt in p.points})} model(s) in "
        f"{p.root}" + (f" (MLflow run {sweep_run})" if sweep_run else "")
    )
    results = []
    try:
        for k, point in enumerate(p.points):
            done = storage.join(p.root, "points", point.name, "point.json")
            if storage.is_file(done, "--out"):
                results.append(PointResult(**json.loads(storage.read_text(done, "--out"))))
                continue
            stage(f"point {k + 1}/{len(p.points)}: {point.name}")
            result = _score(p, point, sweep_run, experiment)
            storage.write_text(done, json.dumps(asdict(result), indent=1), "--out")
            results.append(result)
    except JobStopped as stop:
        if sweep_run and spec.uri:
            SafeLogger(spec.uri, sweep_run).finish("KILLED")
        stop.kept = f"{len(results)} of {len(p.points)} points are scored and kept in {p.root}"
        raise
    front = pareto_front([(r.nfe, r.value) for r in results])
    budgets = spec.budgets or _default_budgets(max(r.nfe for r in results))
    best = best_per_budget(results, budgets)
    summary = {
        "root": p.root,
        "points": [asdict(r) for r in results],
        "front": [results[i].name for i in front],
        "best": {str(k): (asdict(r) if r else None) for k, r in best.items()},
        "mlflow_run_id": sweep_run,
    }
    text = sweep_markdown(results, front, best)
    storage.write_text(storage.join(p.root, "front.md"), text, "--out")
    if sweep_run:
        _log_front(p, sweep_run, results, front, best, text)
    if spec.tag_version:
        from pipelines.core.registry import tag_model_version

        tags: dict[str, object] = {f"best_at_nfe_{k}": f"{r.model}: {r.setting}" for k, r in best.items() if r}
        summary["tagged"] = tag_model_version(spec.uri or "", spec.tag_version, tags)
    print(text)
    return summary


def _sweep_run(p: Plan) -> tuple[str, str]:
    """The sweep's MLflow run (found again on a resume), nested under the training run its models share, and its
    experiment (that run's; else "flowray")."""
    from mlflow.tracking import MlflowClient

    from pipelines.core.tracking import find_or_create_run

    uri = p.spec.uri
    assert uri is not None
    experiment = "flowray"
    if p.train_run_id:
        client = MlflowClient(uri)
        experiment = client.get_experiment(client.get_run(p.train_run_id).info.experiment_id).name
    run_id, resumed = find_or_create_run(
        uri,
        experiment,
        p.spec.name,
        {
            "flowray.kind": "sample_sweep",
            "flowray.storage": p.root,
            "mlflow.note.content": f"sampling sweep of {len(p.points)} points: quality against NFE",
        },
        parent_run_id=p.train_run_id,
    )
    if not resumed:
        log = SafeLogger(uri, run_id)
        s = p.spec
        log.params(
            {
                "sweep.models": ",".join(dict.fromkeys(pt.model for pt in p.points)),
                "sweep.solvers": ",".join(s.solvers),
                "sweep.steps": ",".join(map(str, s.steps)),
                "sweep.grids": ",".join(s.grids),
                "sweep.tolerances": ",".join(f"{t:g}" for t in s.tolerances),
                "sweep.cfg_scales": ",".join(f"{c:g}" for c in s.cfg_scales),
                "sweep.points": len(p.points),
                "sweep.data": p.manifest.directory,
                "sample.num_samples": p.points[0].sample.num_samples if p.points else 0,
                "sample.seed": p.points[0].sample.seed if p.points else 0,
            }
        )
        log.close()
    return run_id, experiment


def _score(p: Plan, point: Point, sweep_run: str | None, experiment: str) -> PointResult:
    """Sample the point, score its samples, log its run (nested under the sweep's, in `experiment`)."""
    start = time.perf_counter()
    samples = run_sampling(point.checkpoint, storage.join(p.root, "points", point.name, "samples"), point.sample)
    q = sample_quality(p.manifest, samples.out, p.ecfg)
    s = point.sample
    value, metric = (q.fd, q.fd_label or "FD") if q.fd is not None else (q.w2, "W2")
    assert value is not None  # (every quality result has an FD or a W2)
    result = PointResult(
        name=point.name,
        model=point.model,
        setting=point.setting,
        solver=s.solver,
        steps=None if is_adaptive(s.solver) else s.steps,
        time_grid=s.time_grid,
        tolerance=s.atol if is_adaptive(s.solver) else None,
        cfg_scale=s.cfg_scale,
        nfe=mean_nfe(samples.out) * (2 if s.cfg_scale != 1.0 else 1),
        metric=metric,
        value=float(value),
        floor=q.fd_floor if q.fd is not None else q.w2_floor,
        matched=q.fd_matched,
        num_samples=q.num_samples,
        seconds=round(time.perf_counter() - start, 1),
        floor_count=q.num_floor if q.fd is not None else q.num_reference,
    )
    if sweep_run:
        result.mlflow_run_id = _log_point(p, point, result, sweep_run, experiment)
    stage(f"{point.name}: {metric} {result.value:.4g} at {result.nfe:g} NFE ({result.seconds:.0f} s)")
    return result


def _log_point(p: Plan, point: Point, r: PointResult, sweep_run: str, experiment: str) -> str:
    from pipelines.core.tracking import find_or_create_run

    uri = p.spec.uri
    assert uri is not None
    run_id, _ = find_or_create_run(
        uri,
        experiment,
        point.name,
        {
            "flowray.kind": "sample_sweep_point",
            "flowray.storage": storage.join(p.root, "points", point.name),
            "flowray.sweep": sweep_run,
            "flowray.checkpoint": point.checkpoint,
            "flowray.setting": f"{point.model}: {point.setting}",
        },
        parent_run_id=sweep_run,
    )
    log = SafeLogger(uri, run_id)
    s = point.sample
    log.params(
        {
            "model": point.model,
            "sample.solver": s.solver,
            "sample.steps": r.steps if r.steps is not None else "",
            "sample.time_grid": s.time_grid,
            "sample.atol": s.atol,
            "sample.rtol": s.rtol,
            "sample.cfg_scale": s.cfg_scale,
            "sample.num_samples": s.num_samples,
            "sample.seed": s.seed,
        }
    )
    metrics = {"nfe": r.nfe, "quality": r.value, "seconds": r.seconds}
    key = "fd" if r.metric != "W2" else "w2"
    metrics[key] = r.value
    if r.floor is not None:
        metrics[f"{key}_floor"] = r.floor
    if r.matched is not None:
        metrics["fd_matched"] = r.matched
    log.metrics(metrics, step=0)
    log.tags({"flowray.metric": r.metric})
    log.finish()
    return run_id


# --- the front --------------------------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """The indices of the (cost, value) points that no other point beats (as cheap or cheaper, and strictly better;
    lower is better in both), ordered by cost."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _default_budgets(max_nfe: float) -> list[int]:
    """1, 2, 4, ... up to the first power of two at or above the costliest point."""
    return [2**k for k in range(max(0, math.ceil(math.log2(max(max_nfe, 1)))) + 1)]


def best_per_budget(results: list[PointResult], budgets: list[int]) -> dict[int, PointResult | None]:
    """For each NFE budget, the point of the lowest value among those that cost at most that much (None: none
    does)."""
    out: dict[int, PointResult | None] = {}
    for k in sorted(budgets):
        within = [r for r in results if r.nfe <= k + 1e-9]
        out[k] = min(within, key=lambda r: r.value) if within else None
    return out


def sweep_markdown(results: list[PointResult], front: list[int], best: dict[int, PointResult | None]) -> str:
    """The points sorted by cost (front points marked), then the best point per NFE budget."""
    metric = results[0].metric if results else "FD"
    lines = [
        f"| model | sampler | NFE | {metric} | {metric} matched | floor | front |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    on_front = {results[i].name for i in front}
    for r in sorted(results, key=lambda r: (r.nfe, r.value)):
        lines.append(
            f"| {r.model} | {r.setting} | {r.nfe:.1f} | {r.value:.4g} | {_num(r.matched)} | {_num(r.floor)} | "
            f"{'*' if r.name in on_front else ''} |"
        )
    lines += ["", f"| NFE budget | best | NFE | {metric} |", "|---:|---|---:|---:|"]
    for k, b in best.items():
        lines.append(f"| {k} | {b.model}: {b.setting} | {b.nfe:.1f} | {b.value:.4g} |" if b else f"| {k} | none | | |")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def plot_front(results: list[PointResult], front: list[int], path: str):
    """Quality against NFE (log 2 axis), one marker per model, the front as a line, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.core.figures import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r.model for r in results):
        mine = [r for r in results if r.model == model]
        ax.scatter([r.nfe for r in mine], [r.value for r in mine], s=18, label=model, alpha=0.8)
    f = [results[i] for i in front]
    ax.plot([r.nfe for r in f], [r.value for r in f], "k-", lw=1, label="Pareto front")
    for r in f:
        ax.annotate(f"{r.model}: {r.setting}", (r.nfe, r.value), fontsize=6, xytext=(3, 3), textcoords="offset points")
    floored = [(r.floor, r) for r in results if r.floor is not None]
    if floored:
        # a Frechet distance depends on its count: the floor is at the held-out images' count, the points at theirs
        floor, r = min(floored, key=lambda fr: fr[0])
        at = f" at {r.floor_count} images; the points at {r.num_samples} samples" if r.floor_count else ""
        ax.axhline(floor, color="grey", ls="--", lw=1, label=f"real-vs-real floor{at}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(results[0].metric if results else "FD")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _log_front(p: Plan, sweep_run: str, results: list[PointResult], front: list[int], best: dict, text: str) -> None:
    """The sweep's run: the table, the plot and the points as artifacts, the best value per budget as metrics."""
    import tempfile
    from pathlib import Path

    from pipelines.core.figures import write_csv

    uri = p.spec.uri
    assert uri is not None
    log = SafeLogger(uri, sweep_run)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "front.md").write_text(text)
        write_csv([asdict(r) for r in results], Path(tmp) / "points.csv")
        plot_front(results, front, str(Path(tmp) / "front.png"))
        for name in ("front.md", "points.csv", "front.png"):
            log.artifact(Path(tmp) / name)
        log.drain(60.0)
    log.metrics({f"best_at_nfe_{k}": r.value for k, r in best.items() if r}, step=0)
    log.tags({f"flowray.best_at_nfe_{k}": f"{r.model}: {r.setting}" for k, r in best.items() if r})
    log.finish()
