"""The Flow Matching paper's comparison (Lipman et al. 2022, Table 1) in miniature, through the real pipeline.

    python -m jobs.reproduce --preset digits [--seeds 0,1,2] [--methods fm_ot,fm_vp,score_vp,icfm,otcfm]
                             [--steps N] [--num-samples N] [--set section.key=value ...]

For every method and seed: Ray Train (same UNet, steps, batch and optimizer) -> Ray sampling stage (dopri5 at
tolerance 1e-5) -> Ray evaluation stage (bits/dim on the test split with K dequantization draws; FD in the data
set's classifier features). For the first seed also an Euler-steps curve (FD against steps) and, for score
matching, reverse-SDE samples. Everything goes into one MLflow experiment; `jobs.compare` prints the table
(mean ± std over seeds). The last stdout line is one JSON object.

Presets: digits (8x8, a CPU budget of under an hour on 2 cores), fashion-mnist-cpu (28x28, 12 to 35 minutes of
training per method on 2 cores, by host; FID of 2,000 samples), fashion-mnist (28x28, a long CPU run), cifar10
(the paper's settings, for a GPU cluster through cluster.yaml and `ray job submit`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fm.methods import JUMP, METHODS
from jobs.cli import add_common, int_list, name_list, run_job


@dataclass
class Preset:
    config: str
    source: str
    data: str
    steps: int
    num_samples: int
    euler_steps: list[int]
    sde_steps: int
    eval_draws: int
    eval_max_images: int
    overrides: list[str] = field(default_factory=list)
    reference_max: int = 0  # FID/FD reference images (0: the whole training split)
    budget: str = "see README"


PRESETS = {
    "digits": Preset(
        "configs/digits-cpu.yaml",
        "digits",
        "data/digits",
        steps=300,
        num_samples=300,
        euler_steps=[2, 5, 10, 20, 50],
        sde_steps=100,
        eval_draws=1,
        eval_max_images=0,
        overrides=["train.sample_every=0", "train.checkpoint_every=300", "train.log_every=50"],
        budget="digits: under 60 min on 2 CPU cores",
    ),
    # 2 CPU cores: each method trains for 12 (the 2026-11-29 host) to 35 minutes (the 2026-12-03 one, 160-219
    # images/s); FID of 2,000 dopri5 samples against ~5,000 training images (Inception runs at 5-11 images/s on 2
    # cores: the whole 60k split would take 1.5 to 3 hours)
    "fashion-mnist-cpu": Preset(
        "configs/fashion-mnist-cpu.yaml",
        "fashion-mnist",
        "data/fashion-mnist",
        steps=3000,
        num_samples=2000,
        euler_steps=[],
        sde_steps=0,
        eval_draws=1,
        eval_max_images=200,
        reference_max=5000,
        budget="fashion-mnist-cpu: 25 to 60 min per method on 2 CPU cores by host, 12 to 35 of them training",
    ),
    "fashion-mnist": Preset(
        "configs/fashion-mnist.yaml",
        "fashion-mnist",
        "data/fashion-mnist",
        steps=20000,
        num_samples=5000,
        euler_steps=[2, 5, 10, 20, 50, 100],
        sde_steps=200,
        eval_draws=1,
        eval_max_images=1000,
    ),
    "cifar10": Preset(
        "configs/cifar10.yaml",
        "parquet:/mnt/shared/data/cifar10-src/*.parquet",
        "/mnt/shared/data/cifar10",
        steps=391000,
        num_samples=50000,
        euler_steps=[2, 5, 10, 20, 50, 100],
        sde_steps=1000,
        eval_draws=1,
        eval_max_images=0,
        overrides=["ray.use_gpu=true"],
    ),
}
DEFAULT_METHODS = ["fm_ot", "fm_vp", "score_vp", "icfm", "otcfm"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    p.add_argument("--methods", type=name_list, default=DEFAULT_METHODS)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--euler-steps", type=int_list, default=None, help="comma-separated Euler step counts for the curve")
    p.add_argument("--experiment", default=None)
    p.add_argument("--data", default=None, help="ingest output directory (default: the preset's)")
    p.add_argument("--eval-max-images", type=int, default=None, help="cap the test images for bits/dim")
    p.add_argument("--out", default="outputs/reproduce")
    add_common(p, tracking=False)
    a = p.parse_args(argv)
    for m in a.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    return run_job("reproduce", a, lambda: _reproduce(a))


def _reproduce(a) -> dict:
    from pipelines.core.storage import check_name

    preset = PRESETS[a.preset]
    steps = a.steps or preset.steps
    num_samples = a.num_samples or preset.num_samples
    euler = a.euler_steps or preset.euler_steps
    experiment = check_name(a.experiment or f"reproduce-{a.preset}", "--experiment")  # a folder under --out
    data = a.data or preset.data
    max_images = preset.eval_max_images if a.eval_max_images is None else a.eval_max_images
    out = Path(a.out) / experiment

    from pipelines.chain import ensure_ingested, train_sample_evaluate
    from pipelines.train.config import load_config

    # One config per method, validated in full before anything runs.
    configs = {}
    for method in a.methods:
        for seed in a.seeds:
            sets = [
                *preset.overrides,
                f"data.shards={data}",
                f"train.steps={steps}",
                f"train.seed={seed}",
                f"method.name={method}",
                f"train.run_name={experiment}-{method}-s{seed}",
                f"train.storage_path={out / 'ray_results'}",
                f"mlflow.experiment={experiment}",
                *a.overrides,
            ]
            if method == "otcfm":
                sets.append("method.ot_scope=global")
            configs[(method, seed)] = load_config(preset.config, sets)
    ensure_ingested(preset.source, data)

    from pipelines.batch.config import EvalConfig, SampleConfig
    from pipelines.compare import COLUMNS, collect, markdown, plot_nfe_vs_fd, table
    from pipelines.core.figures import write_csv

    start = time.perf_counter()
    timings = []
    for (method, seed), cfg in configs.items():
        t0 = time.perf_counter()
        solves = [
            SampleConfig(
                num_samples=num_samples, solver="dopri5", atol=1e-5, rtol=1e-5, seed=seed, block_size=100, actors=2
            )
        ]
        if not METHODS[method].velocity_field:  # MeanFlow: one jump for every seed, 2 and 4 for the first
            solves = [
                SampleConfig(num_samples=num_samples, solver=JUMP, steps=n, seed=seed, block_size=100, actors=2)
                for n in ([1, 2, 4] if seed == a.seeds[0] else [1])
            ]
        elif seed == a.seeds[0]:
            solves += [
                SampleConfig(num_samples=num_samples, solver="euler", steps=n, seed=seed, block_size=100, actors=2)
                for n in euler
            ]
            if method == "score_vp" and preset.sde_steps:
                solves.append(
                    SampleConfig(
                        num_samples=num_samples,
                        solver="sde",
                        steps=preset.sde_steps,
                        seed=seed,
                        block_size=100,
                        actors=2,
                    )
                )
        ecfg = EvalConfig(
            draws=preset.eval_draws,
            divergence="hutchinson",
            probes=1,
            batch_size=60,
            actors=2,
            max_images=max_images,
            seed=seed,
            reference_max=preset.reference_max,
        )
        chain = train_sample_evaluate(cfg, solves, ecfg, out / "samples" / f"{method}-s{seed}")
        uri = chain.train.tracking_uri
        timings.append(
            {
                "method": method,
                "seed": seed,
                "train_s": chain.train.wall_s,
                "total_s": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps({"progress": timings[-1]}), flush=True)
    rows = table(collect(uri, experiment))
    md = markdown(rows)
    csv_path = write_csv(rows, out / "table.csv", COLUMNS)
    (out / "table.md").write_text(md + "\n")
    plot = plot_nfe_vs_fd(rows, out / "nfe-vs-fd.png")
    print(md)
    result = {
        "experiment": experiment,
        "budget": preset.budget,
        "tracking_uri": uri,
        "preset": a.preset,
        "seeds": a.seeds,
        "methods": a.methods,
        "train_steps": steps,
        "num_samples": num_samples,
        "euler_steps": euler,
        "eval_draws": preset.eval_draws,
        "wall_s": round(time.perf_counter() - start, 1),
        "timings": timings,
        "table_md": str(out / "table.md"),
        "table_csv": str(csv_path),
        "plot": str(plot) if plot else None,
        "rows": rows,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
