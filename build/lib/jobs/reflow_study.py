"""Few-step sampling at equal training steps: trained flows against their reflows (Rectified Flow's reflow),
and uniform against logit-normal time sampling, through the real pipeline.

    flowray reflow-study --config configs/digits-cpu.yaml --data data/digits [--source digits]
        [--methods icfm,otcfm,otcfm:logit_normal,meanflow] [--reflow-from otcfm] [--distill] [--seeds 0,1] [--steps 600]
        [--reflow-at 300] [--num-pairs 3000] [--solvers euler:1,euler:2,euler:4,euler:8,dopri5]
        [--num-samples 500] [--name reflow-study] [--out outputs/reflow-study] [--set section.key=value ...]

Every row trains the same model on the same data for `--steps` steps in all. A method row (METHOD, or
METHOD:logit_normal for logit-normal t with loc 0 and scale 1) trains `--steps` steps, keeping its checkpoint at
`--reflow-at`. A reflow row (`--reflow-from`) takes that step-`--reflow-at` checkpoint of the same run, samples
`--num-pairs` pairs from it with dopri5 (the batch stage; each pair's noise regenerated from its seed, the row's seed
+ 1000, so that no model is evaluated on the noise of its own training pairs), and trains
the reflowed model on them for the remaining `--steps` - `--reflow-at` steps, warm-started from it (`flowray
reflow`'s chain, one round). Each trained model is sampled with every `--solvers` entry and evaluated on the real
data: FD (or FID) with its floor, bits/dim, straightness, every sampler starting from the row's seed's noise. A
second table gives each FD at the floor's image count (`fd_matched`: as many samples as held-out images), the one
figure a floor can be compared with.

A model sampled in jumps (MeanFlow's average velocity, a distilled one-step map) has no velocity field to integrate: it
takes the columns of the fixed-step solvers with as many network calls (k jumps in the euler:k column; a distilled map
its one jump in the euler:1 column only), and none of the adaptive solver's, straightness or bits/dim. `--distill` adds,
after each reflow, the reflowed model distilled into a one-step map (Liu et al. 2022, Sec. 2.3; `flowray reflow
--distill`): pairs from the reflowed model, and `--steps` - `--reflow-at` more steps of method distill warm-started from
it (so that row trains more steps than the others, as the table says). The tables (mean ± std over seeds) go to
OUT/NAME/table.md, every figure to OUT/NAME/result.json, and every run to one MLflow experiment (NAME). The last stdout
line is one JSON object.

The study runs seed by seed, and each row is kept in OUT/NAME/rows.json as it finishes. Rerun the same command after a
stop, and the kept rows are read back rather than redone; a row stopped part way continues its training run, sampling
and reflow chain where they were. A rerun under the same name with other settings (steps, pairs, samples, solvers,
config, data, --set) is refused in words; other --methods and --seeds add rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from jobs.cli import add_common, int_list, name_list, run_job

TIME_VARIANTS = ("uniform", "logit_normal")
PAIR_SEED_OFFSET = 1000  # the pairs of seed s draw their noise from seed s + 1000; evaluation samplers from s


def parse(argv):
    from fm.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits-cpu.yaml", help="the training config of every row (YAML)")
    p.add_argument("--data", default="data/digits", help="the real data's shards (ingested from --source if absent)")
    p.add_argument("--source", default="digits", help="what to ingest into --data when it holds no manifest")
    p.add_argument(
        "--methods", type=name_list, default=["icfm", "otcfm"], help="METHOD or METHOD:logit_normal, comma-separated"
    )
    p.add_argument("--reflow-from", default="otcfm", help="methods whose reflow is trained ('' for none)")
    p.add_argument("--distill", action="store_true", help="each reflow distilled into a one-step map too (a row)")
    p.add_argument("--seeds", type=int_list, default=[0, 1])
    p.add_argument("--steps", type=int, default=600, help="training steps of every row, in all")
    p.add_argument("--reflow-at", type=int, default=300, help="the generating checkpoint's step")
    p.add_argument("--num-pairs", type=int, default=3000)
    p.add_argument("--solvers", default="euler:1,euler:2,euler:4,euler:8,dopri5")
    p.add_argument("--num-samples", type=int, default=500, help="samples per solver")
    p.add_argument("--name", default="reflow-study")
    p.add_argument("--out", default="outputs/reflow-study")
    add_common(p, tracking=False)
    a = p.parse_args(argv)
    a.variants = [tuple(m.partition(":")[::2]) for m in a.methods]
    a.reflow_from = [m for m in a.reflow_from.split(",") if m]
    for method, timing in a.variants:
        if method not in METHODS:
            p.error(f"--methods: unknown method {method!r}; allowed: {', '.join(METHODS)}")
        if timing not in ("", *TIME_VARIANTS):
            p.error(f"--methods: {method}:{timing}: unknown time sampling; allowed: {', '.join(TIME_VARIANTS)}")
    for method in a.reflow_from:
        if (method, "") not in a.variants:
            p.error(f"--reflow-from: {method!r} is not one of --methods' uniform-time methods")
    if not 0 < a.reflow_at < a.steps:
        p.error(f"--reflow-at: {a.reflow_at} must be between 0 and --steps ({a.steps}), exclusive")
    # a model sampled in jumps takes the fixed-step columns only (`columns_of`), a one-step map the 1-step column
    steps = [s.partition(":")[2] for s in a.solvers.split(",") if s.strip()]
    jumps = [m for m, _ in a.variants if not METHODS[m].velocity_field]
    if jumps and not any(steps):
        p.error(
            f"--solvers: {a.solvers!r} has no fixed-step solver (SOLVER:STEPS) for {jumps[0]}, which samples in jumps"
        )
    if a.distill and "1" not in steps:
        p.error(f"--solvers: {a.solvers!r} has no one-step column (e.g. euler:1) for the distilled one-step maps")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    return run_job("reflow_study", a, lambda: _study(a))


def _label(method: str, timing: str) -> str:
    return f"{method} ({timing or 'uniform'} t)"


ROWS = "rows.json"  # every finished row of a study, kept as it finishes: a rerun under the same name skips them
# the flags that change a row's figures: a study resumed under its name must keep them
SETTINGS = ("config", "data", "steps", "reflow_at", "num_pairs", "num_samples", "solvers", "overrides")


def _settings(a) -> dict:
    return {k: getattr(a, k) for k in SETTINGS}


def load_rows(out: Path, a) -> dict[str, list[dict]]:
    """The rows a study of this name already finished (OUT/NAME/rows.json), by table label; refused in words when
    that study ran with other settings (`SETTINGS`), since its figures would not compare with this run's."""
    from pipelines.core.errors import ConfigError

    path = out / ROWS
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    mine = _settings(a)
    diff = [k for k in SETTINGS if saved["settings"].get(k) != mine[k]]
    if diff:
        flag = {"overrides": "set"}  # the one setting whose flag is not its name
        theirs = ", ".join(f"--{flag.get(k, k).replace('_', '-')} {saved['settings'].get(k)!r}" for k in diff)
        raise ConfigError(
            f"reflow study {a.name!r} at {out} has rows measured with {theirs}; rerun it with the same flags to "
            "continue it, or give a new --name"
        )
    return saved["rows"]


def save_rows(out: Path, a, rows: dict[str, list[dict]]) -> None:
    """Write the finished rows whole (a temporary file, then a rename): a study killed while writing keeps the last."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (ROWS + ".tmp")
    tmp.write_text(json.dumps({"settings": _settings(a), "rows": rows}, indent=1, default=str))
    tmp.replace(out / ROWS)


def kept_row(rows: dict[str, list[dict]], label: str, seed: int) -> dict | None:
    """The figures of one row's seed among the kept rows, if it finished."""
    return next((f for f in rows.get(label, []) if f["seed"] == seed), None)


def row_order(a) -> list[str]:
    """The table's rows in the order of --methods, each reflow (and its distillation) after its method."""
    labels = []
    for method, timing in a.variants:
        labels.append(_label(method, timing))
        if not timing and method in a.reflow_from:
            labels += [f"reflow of {method}"] + [f"distilled reflow of {method}"] * a.distill
    return labels


def _study(a) -> dict:
    from pipelines.batch.config import EvalConfig
    from pipelines.chain import ensure_ingested, train_sample_evaluate
    from pipelines.core import storage
    from pipelines.core.runtime import stage
    from pipelines.core.storage import check_name
    from pipelines.reflow import ReflowSpec, run_reflow, solves_from
    from pipelines.train.config import load_config

    out = Path(a.out) / check_name(a.name, "--name")
    common = [
        f"data.shards={a.data}",
        f"mlflow.experiment={a.name}",
        f"train.storage_path={out / 'ray_results'}",
        "train.sample_every=0",
        "train.log_every=50",
        *a.overrides,
    ]
    configs = {}
    for method, timing in a.variants:  # every config checked before anything runs
        for seed in a.seeds:
            sets = [
                *common,
                f"method.name={method}",
                f"train.steps={a.steps}",
                f"train.seed={seed}",
                f"train.checkpoint_every={a.reflow_at}",
                "train.num_to_keep=1000",
                f"train.run_name={a.name}-{method}{'-' + timing if timing else ''}-s{seed}",
            ]
            sets += ["method.ot_scope=global"] if method == "otcfm" else []
            sets += [f"method.time_sampling={timing}"] if timing else []
            configs[(method, timing, seed)] = load_config(a.config, sets)
    ensure_ingested(a.source, a.data)

    ecfg = EvalConfig(divergence="hutchinson", probes=1, batch_size=60, actors=2)
    kept = load_rows(out, a)
    rows: dict[str, list[dict]] = {}
    start = time.perf_counter()

    def record(label: str, figures: dict, what: str, method: str, seed: int) -> None:
        rows.setdefault(label, []).append(figures)
        kept.setdefault(label, []).append(figures)
        save_rows(out, a, kept)
        print(json.dumps({"progress": [method, what, seed, figures]}), flush=True)

    def reuse(label: str, seed: int) -> bool:
        """Take a row's seed from the kept rows, if it finished before."""
        figures = kept_row(kept, label, seed)
        if figures is not None:
            rows.setdefault(label, []).append(figures)
        return figures is not None

    # seed by seed, so that a study stopped part way holds whole seeds of every row
    for seed in a.seeds:
        for method, timing in a.variants:
            cfg = configs[(method, timing, seed)]
            solves = solves_from(a.solvers, a.num_samples, {"seed": seed, "block_size": 100, "actors": 2})
            columns, own = columns_of(method, solves)
            label = _label(method, timing)
            reflowed = not timing and method in a.reflow_from
            wanted = [label] + ([f"reflow of {method}"] + [f"distilled reflow of {method}"] * a.distill) * reflowed
            if all(kept_row(kept, w, seed) for w in wanted):
                for w in wanted:
                    reuse(w, seed)
                stage(f"kept from {out / ROWS}: {', '.join(wanted)}, seed {seed}")
                continue
            if reuse(label, seed):
                run_dir = storage.join(cfg.train.storage_path, cfg.train.run_name)
            else:
                chain = train_sample_evaluate(cfg, own, ecfg, out / "samples" / f"{method}{timing}-s{seed}")
                record(label, _figures(chain.solves, seed, chain.train.wall_s, columns), timing, method, seed)
                run_dir = chain.train.run_dir
            if not reflowed:
                continue
            spec = ReflowSpec(
                checkpoint=_checkpoint_at(run_dir, a.reflow_at),
                data=a.data,
                num_pairs=a.num_pairs,
                config=a.config,
                overrides=[*common, f"train.steps={a.steps - a.reflow_at}", f"train.seed={seed}"],
                rounds=1,
                solves=solves,
                eval_config=ecfg,
                out=str(out / "reflow"),
                name=f"{a.name}-{method}-s{seed}-reflow",
                baseline=False,
                distill=a.distill,
                pair_sampler=solves_from(
                    "dopri5", a.num_pairs, {"seed": seed + PAIR_SEED_OFFSET, "block_size": 100, "actors": 2}
                )[0],
            )
            r, *distilled = run_reflow(spec)["rounds"]  # a chain stopped part way continues where it was
            figures = _figures(r["records"], seed, r["train"].wall_s, columns_of("reflow", solves)[0])
            figures.update(
                pairs_per_s=r["pairs"]["samples_per_s"],
                pairs_wall_s=r["pairs"]["wall_s"],
                pairs_and_ingest_s=r["pairs_and_ingest_s"],
                pairs_nfe=r["pairs"]["mean_nfe"],
            )
            if not reuse(f"reflow of {method}", seed):
                record(f"reflow of {method}", figures, "reflow", method, seed)
            for d in distilled:  # its one jump in the one-network-call column
                figures = _figures(d["records"], seed, d["train"].wall_s, columns_of("distill", solves)[0])
                record(f"distilled reflow of {method}", figures, "distill", method, seed)
    rows = {label: rows[label] for label in row_order(a) if label in rows}
    tags = [s.strip() for s in a.solvers.split(",") if s.strip()]
    table = markdown(rows, tags, a)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    result = {
        "name": a.name,
        "config": a.config,
        "data": a.data,
        "seeds": a.seeds,
        "steps": a.steps,
        "reflow_at": a.reflow_at,
        "num_pairs": a.num_pairs,
        "num_samples": a.num_samples,
        "solvers": tags,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
        "table_md": str(out / "table.md"),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(table)
    print(json.dumps(result, default=str))
    return result


def _checkpoint_at(run_dir: str, step: int) -> str:
    """The checkpoint of `step` among a run's kept ones (Ray Train's `checkpoint_*` folders)."""
    import pyarrow.fs as pafs

    from pipelines.core import storage
    from pipelines.core.checkpoint import load_meta

    fs, path = storage.resolve(run_dir)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            folder = storage.join(run_dir, info.base_name)
            if load_meta(folder).step == step:
                return folder
    raise RuntimeError(f"{run_dir} kept no checkpoint of step {step}")


def columns_of(method: str, solves: list) -> tuple[list[str], list]:
    """The table columns (the `--solvers` tags) a method's model is sampled in, and its samplers for them: every
    solver for a velocity field; for a model sampled in jumps, k jumps in each fixed-step column of k steps (a
    one-step map: k = 1 only), and no adaptive column."""
    from dataclasses import replace

    from fm.methods import JUMP, METHODS
    from fm.solvers import is_adaptive
    from pipelines.chain import solver_tag

    preset = METHODS[method]
    if preset.velocity_field:
        return [solver_tag(s) for s in solves], list(solves)
    fits = [
        s for s in solves if not is_adaptive(s.solver) and s.solver != "sde" and (s.steps == 1 or not preset.one_step)
    ]
    return [solver_tag(s) for s in fits], [replace(s, solver=JUMP) for s in fits]


def _figures(records, seed: int, train_s: float, columns: list[str]) -> dict:
    """One trained model's figures, by table column (`columns[i]` holds `records[i]`): FD at each solver, the NFE,
    straightness, bits/dim."""
    ev = records[0].evaluation
    q = ev.quality
    return {
        "seed": seed,
        "train_s": train_s,
        "fd_label": q.fd_label,
        "fd_floor": q.fd_floor,
        "fd": {c: r.evaluation.quality.fd for c, r in zip(columns, records, strict=True)},
        "fd_matched": {c: r.evaluation.quality.fd_matched for c, r in zip(columns, records, strict=True)},
        "num_matched": q.num_matched,
        "nfe": {c: r.sample.mean_nfe for c, r in zip(columns, records, strict=True)},
        "straightness": ev.straightness.straightness if ev.straightness else None,
        "bpd": ev.likelihood.mean if ev.likelihood else None,
    }


def _cell(values: list[float], fmt: str = ".2f") -> str:
    """Mean ± sample standard deviation (n - 1) of one cell's values over seeds; the value alone for one seed."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def markdown(rows: dict[str, list[dict]], tags: list[str], a) -> str:
    """FD at every solver, the adaptive solver's NFE, straightness and bits/dim: mean ± std over seeds."""
    from pipelines.chain import solver_tag
    from pipelines.reflow import solves_from

    first = next(iter(rows.values()))[0]
    solver_keys = [solver_tag(s) for s in solves_from(",".join(tags), 1)]  # the figures' keys: euler:1 -> euler1
    head = (
        "| model | "
        + " | ".join(f"{first['fd_label']} {t}" for t in tags)
        + f" | NFE ({tags[-1]}) | straightness | bits/dim | seeds |"
    )
    lines = [head, "|" + " --- |" * (len(tags) + 5)]
    for label, figs in rows.items():
        cells = [_cell([f["fd"].get(k) for f in figs]) for k in solver_keys]
        cells += [
            _cell([f["nfe"].get(solver_keys[-1]) for f in figs], ".0f"),
            _cell([f["straightness"] for f in figs], ".3g"),
            _cell([f["bpd"] for f in figs], ".3f"),
            str(len(figs)),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floors = [f["fd_floor"] for figs in rows.values() for f in figs if f["fd_floor"] is not None]
    if floors:
        lines.append(f"\n{first['fd_label']} floor (held-out real images against the reference): {floors[0]:.3f}")
    if first.get("num_matched"):  # a Fréchet distance falls with its sample count: the floor's count beside it
        lines += [
            f"\nAt the floor's count ({first['num_matched']} samples against the reference, as the floor's "
            f"{first['num_matched']} held-out images are):",
            "",
            "| model | " + " | ".join(f"{first['fd_label']} {t}" for t in tags) + " | floor |",
            "|" + " --- |" * (len(tags) + 2),
        ]
        for label, figs in rows.items():
            cells = [_cell([f["fd_matched"].get(k) for f in figs]) for k in solver_keys]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_cell([f['fd_floor'] for f in figs], '.3f')} |")
    pairs = [f for figs in rows.values() for f in figs if "pairs_per_s" in f]
    if pairs:
        lines.append(
            f"\nPairs (dopri5, {a.num_pairs} per reflow): "
            f"{_cell([f['pairs_per_s'] for f in pairs], '.1f')} samples/s on the batch stage, "
            f"{_cell([f['pairs_wall_s'] for f in pairs], '.0f')} s sampling, "
            f"{_cell([f['pairs_and_ingest_s'] for f in pairs], '.0f')} s with ingest, mean NFE "
            f"{_cell([f['pairs_nfe'] for f in pairs], '.0f')}; training {a.steps} steps in all per row "
            f"(reflow rows: {a.reflow_at} + {a.steps - a.reflow_at}"
            + (f"; distilled rows {a.steps - a.reflow_at} more" if any("distilled" in k for k in rows) else "")
            + ")."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
