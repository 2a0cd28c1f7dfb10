"""Compare runs from MLflow: the paper-style table (method / path / coupling × bits/dim × FD × NFE × steps) and an
NFE-against-quality plot. Some runs add their own columns where any has them: on points NLL in nats, W2 with its
floor (geodesic on a manifold) and the worst W2 / floor over a snapshot method's observed times; Euclidean methods
the straightness of their trajectories (`fm.straightness`), which is what few-step sampling depends on."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from fm.methods import describe
from fm.solvers import is_adaptive
from pipelines.core.errors import ConfigError
from pipelines.core.figures import save_figure

COLUMNS = [
    "method",
    "path",
    "coupling",
    "solver",
    "sample_steps",
    "train_steps",
    "runs",
    "bpd",
    "fd",
    "fd_matched",
    "fd_floor",
    "fd_label",
    "sample_nfe",
    "likelihood_nfe",
    "train_run_ids",
    "eval_run_ids",
]
# (metric, header) of the columns that only some runs have; a column shows when some run has its metric
OPTIONAL_COLUMNS = [
    ("nll", "NLL (nats)"),
    ("w2", "W2"),
    ("w2_floor", "W2 floor"),
    ("w2_ratio_max", "worst W2 / floor"),
    ("straightness", "straightness"),
]


def collect(uri: str, experiment: str, filter_string: str = "") -> list[dict]:
    """One record per evaluation run, joined with its training and sampling runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}; experiments: {', '.join(names)}")
    query = "tags.`flowray.kind` = 'evaluate'" + (f" and {filter_string}" if filter_string else "")
    records = []
    for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=5000):
        tags, metrics = run.data.tags, run.data.metrics
        solver = tags.get("flowray.sample_solver", "")
        train = _get(client, tags.get("flowray.train_run_id"))
        sample = _get(client, tags.get("flowray.sample_run_id"))
        method = tags.get("flowray.method") or (train.data.params.get("method.name") if train else "?")
        path, coupling = describe(method, train.data.params.get("method.ot_scope", "local") if train else "local")
        records.append(
            {
                "method": method,
                "path": path,
                "coupling": coupling,
                # every method key the training run set (the coupling's scope is the coupling column already)
                "method_keys": {
                    k.removeprefix("method."): v
                    for k, v in (train.data.params if train else {}).items()
                    if k.startswith("method.") and k not in ("method.name", "method.ot_scope")
                },
                "solver": solver,
                "sample_steps": "adaptive" if is_adaptive(solver) else tags.get("flowray.sample_steps", ""),
                "train_steps": train.data.params.get("train.steps", "") if train else "",
                "bpd": metrics.get("bpd"),
                "fd": metrics.get("fd"),
                "fd_floor": metrics.get("fd_floor"),
                "fd_matched": metrics.get("fd_matched"),
                "fd_label": tags.get("flowray.fd_label", "FD"),
                "sample_nfe": sample.data.metrics.get("mean_nfe") if sample else None,
                "likelihood_nfe": metrics.get("likelihood_nfe"),
                **{key: metrics.get(key) for key, _ in OPTIONAL_COLUMNS},
                "train_run_id": train.info.run_id if train else "",
                "eval_run_id": run.info.run_id,
            }
        )
    return records


def _get(client, run_id):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:
        return None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return None, None
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, std


def variants(records: list[dict]) -> list[str]:
    """Each record's method label: its name, and in brackets every method key whose value differs between runs of
    that method (e.g. `otcfm (time_sampling=logit_normal)`), so that runs of models that differ never share a row."""
    varying: dict[str, set[str]] = defaultdict(set)
    for name in {r["method"] for r in records}:
        mine = [r.get("method_keys") or {} for r in records if r["method"] == name]
        # a key some runs do not record (they predate it) differs only where the runs that record it differ
        varying[name] = {k for keys in mine for k in keys if len({str(m[k]) for m in mine if k in m}) > 1}
    out = []
    for r in records:
        keys = r.get("method_keys") or {}
        differ = ", ".join(f"{k}={keys.get(k, '–')}" for k in sorted(varying[r["method"]]))
        out.append(f"{r['method']} ({differ})" if differ else r["method"])
    return out


def table(records: list[dict]) -> list[dict]:
    """Rows grouped by (method and every method key that differs between its runs, path, coupling, solver, steps,
    train steps): mean and std over runs (seeds)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r, method in zip(records, variants(records), strict=True):
        groups[(method, r["path"], r["coupling"], r["solver"], r["sample_steps"], r["train_steps"])].append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][3], str(kv[0][4]).zfill(6))):
        row = dict(zip(["method", "path", "coupling", "solver", "sample_steps", "train_steps"], key, strict=True))
        row["runs"] = len(rs)
        for col in ("bpd", "fd", "fd_matched", "fd_floor", "sample_nfe", "likelihood_nfe", *dict(OPTIONAL_COLUMNS)):
            row[col], row[f"{col}_std"] = _mean_std([r[col] for r in rs])
        row["fd_label"] = rs[0]["fd_label"]
        row["train_run_ids"] = " ".join(sorted({r["train_run_id"] for r in rs if r["train_run_id"]}))
        row["eval_run_ids"] = " ".join(r["eval_run_id"] for r in rs)
        rows.append(row)
    return rows


def _fmt(mean, std, digits=3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if not std else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    fd_label = rows[0]["fd_label"] if rows else "FD"
    extra = [(key, header) for key, header in OPTIONAL_COLUMNS if any(r.get(key) is not None for r in rows)]
    head = [
        "method",
        "path",
        "coupling",
        "solver",
        "steps",
        "train steps",
        "runs",
        "bits/dim",
        fd_label,
        f"{fd_label} at the floor's count",
        "floor (real vs real)",
        *[h for _, h in extra],
        "sample NFE",
        "likelihood NFE",
        "training runs",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    r["path"],
                    r["coupling"],
                    r["solver"],
                    str(r["sample_steps"]),
                    str(r["train_steps"]),
                    str(r["runs"]),
                    _fmt(r["bpd"], r["bpd_std"]),
                    _fmt(r["fd"], r["fd_std"]),
                    _fmt(r["fd_matched"], r["fd_matched_std"]),
                    _fmt(r["fd_floor"], r["fd_floor_std"]),
                    *[_fmt(r[key], r[f"{key}_std"]) for key, _ in extra],
                    _fmt(r["sample_nfe"], r["sample_nfe_std"], 0),
                    _fmt(r["likelihood_nfe"], r["likelihood_nfe_std"], 0),
                    r["train_run_ids"],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot_series(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Rows with FD and NFE per method, split as the table splits them: {"fixed": [...] by NFE, "adaptive": [...]}.
    Fixed-step solvers form a curve; every adaptive solver (fm.solvers.is_adaptive) is a single point."""
    pts = [r for r in rows if r["fd"] is not None and r["sample_nfe"] is not None]
    series: dict[str, dict[str, list[dict]]] = {}
    for method in sorted({r["method"] for r in pts}):
        mine = [r for r in pts if r["method"] == method]
        series[method] = {
            "fixed": sorted((r for r in mine if not is_adaptive(r["solver"])), key=lambda r: r["sample_nfe"]),
            "adaptive": [r for r in mine if is_adaptive(r["solver"])],
        }
    return series


def plot_nfe_vs_fd(rows: list[dict], path: str | Path) -> Path | None:
    """FD against sampling NFE per method: fixed-step solvers as a line, adaptive solvers as marked points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(rows)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, parts) in enumerate(series.items()):
        color = f"C{i}"
        fixed = parts["fixed"]
        if fixed:
            ax.plot(
                [r["sample_nfe"] for r in fixed],
                [r["fd"] for r in fixed],
                "o-",
                color=color,
                label=f"{method} ({fixed[0]['solver']})",
            )
        for r in parts["adaptive"]:
            ax.plot(r["sample_nfe"], r["fd"], "*", ms=14, color=color, label=f"{method} {r['solver']}")
    ax.set_xscale("log")
    ax.set_xlabel("sampling NFE")
    ax.set_ylabel(rows[0]["fd_label"])
    ax.legend(fontsize=8)
    return save_figure(fig, path)


VERSION_TAGS = (
    "method",
    "path",
    "coupling",
    "train_steps",
    "data",
    "bpd",
    "nll",
    "fd_label",
    "fd",
    "fd_floor",
    "likelihood_nfe",
    "evaluated_step",
)


def model_versions(uri: str, name: str) -> list[dict]:
    """Every version of a registered model, newest first: version, aliases, description and its `flowray.*` tags
    (what training described and the latest evaluation set)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.search_model_versions(f"name = '{name}'")
    if not found:
        return []
    aliases: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(found, key=lambda v: int(v.version), reverse=True):
        tags = {k.removeprefix("flowray."): val for k, val in (v.tags or {}).items() if k.startswith("flowray.")}
        rows.append(
            {
                "version": int(v.version),
                "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                "description": v.description or "",
                **tags,
            }
        )
    return rows


def versions_markdown(rows: list[dict]) -> str:
    """The registry versions as a markdown table: the version, its aliases, and the tags of `VERSION_TAGS` it has."""
    keys = [k for k in VERSION_TAGS if any(k in r for r in rows)]
    lines = [
        "| version | aliases | " + " | ".join(keys) + " |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for r in rows:
        lines.append(f"| {r['version']} | {r['aliases']} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def sweep_trials(uri: str, parent_run_id: str, metric: str = "val_loss", mode: str = "min") -> list[dict]:
    """The trials of a sweep (the MLflow runs nested under its run), best first by the best value of `metric` over
    each trial's checkpoints: name, swept values, seed, outcome, steps trained, last loss, last and best metric."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], max_results=5000, filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    rows = []
    for run in runs:
        tags = run.data.tags
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        values = [m.value for m in history]
        best = (min if mode == "min" else max)(values) if values else None
        rows.append(
            {
                "trial": tags.get("mlflow.runName", run.info.run_id),
                **json.loads(tags.get("flowray.sweep.values", "{}")),
                "seed": tags.get("flowray.sweep.seed", ""),
                "status": tags.get("flowray.sweep.status", run.info.status.lower()),
                "steps": max([m.step for m in losses + history], default=0),
                "loss": losses[-1].value if losses else None,
                metric: values[-1] if values else None,
                f"best_{metric}": best,
                "run_id": run.info.run_id,
            }
        )
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (r[f"best_{metric}"] is None, sign * (r[f"best_{metric}"] or 0.0)))


def sweep_markdown(rows: list[dict]) -> str:
    """A sweep's trials as a markdown table, its columns those of `sweep_trials` (numbers to 4 significant digits)."""
    if not rows:
        return "(no trials)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def plot_curves(uri: str, rows: list[dict], metric: str, path: str | Path) -> Path | None:
    """`metric` against step for each trial of `sweep_trials` (dashed: a trial that did not finish)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for r in rows:
        history = sorted(client.get_metric_history(r["run_id"], metric), key=lambda m: m.step)
        if not history:
            continue
        ax.plot(
            [m.step for m in history],
            [m.value for m in history],
            "o-" if r["status"] == "finished" else "o--",
            label=f"{r['trial']} ({r['status']})",
        )
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
