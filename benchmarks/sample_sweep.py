"""Points per hour of `flowray sample-sweep` against the same points run as separate `flowray sample` + `flowray
evaluate` commands, side by side in one run (A/B/A/B, so that host drift cancels).

    python -m benchmarks.sample_sweep [--checkpoint DIR] [--points euler:2,euler:4,heun2:2,heun2:4]
        [--num-samples 500] [--repeats 2] [--actors 1,2]

Both sides score the same points of one digits checkpoint (trained here for 100 steps when --checkpoint is not
given) on data/digits: each point samples --num-samples and scores them (the digits classifier's FD with its floor).
The separate commands are what a user runs without the sweep, each a fresh process: `jobs.sample`, then
`jobs.evaluate --samples` with the likelihood cut to 8 test rows and no straightness (`eval.max_images=8`,
`eval.straightness_samples=0`: the closest `flowray evaluate` comes to scoring samples alone). Both use --no-mlflow,
and the classifier and the reference statistics are cached before the first timed run (a warm-up sweep), so
neither side pays for them (their actor counts: the default, as many as the cores hold). Then the sweep alone at
each of --actors actors per stage (`sample.actors`, `eval.actors`). Prints one JSON object: the seconds of each
run, points per hour, the ratio, and the sweep's seconds by actors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

PY = sys.executable


def _train(tmp: str) -> str:
    """A digits checkpoint of 100 steps on one worker (what the points sample from)."""
    out = subprocess.run(
        [
            PY,
            "-m",
            "jobs.train",
            "--config",
            "configs/digits-cpu.yaml",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{tmp}/m.db",
            "--set",
            "train.steps=100",
            "--set",
            "ray.num_workers=1",
            "--set",
            f"train.storage_path={tmp}/runs",
            "--set",
            "train.run_name=bench",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["checkpoint"]


def _sweep(ckpt: str, points: list[tuple[str, int]], n: int, out: str, name: str, actors: int = 0) -> float:
    solvers = sorted({s for s, _ in points})
    steps = sorted({k for _, k in points})
    start = time.perf_counter()
    subprocess.run(
        [
            PY,
            "-m",
            "jobs.sample_sweep",
            "--name",
            name,
            "--data",
            "data/digits",
            "--checkpoint",
            ckpt,
            "--solvers",
            ",".join(solvers),
            "--steps",
            ",".join(map(str, steps)),
            "--num-samples",
            str(n),
            "--out",
            out,
            "--no-mlflow",
            "--set",
            f"sample.actors={actors}",
            "--set",
            f"eval.actors={actors}",
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def _separate(ckpt: str, points: list[tuple[str, int]], n: int, out: str) -> float:
    start = time.perf_counter()
    for solver, steps in points:
        samples = f"{out}/{solver}{steps}"
        for argv in (
            [
                "jobs.sample",
                "--checkpoint",
                ckpt,
                "--num-samples",
                str(n),
                "--out",
                samples,
                "--set",
                f"sample.solver={solver}",
                "--set",
                f"sample.steps={steps}",
            ],
            [
                "jobs.evaluate",
                "--checkpoint",
                ckpt,
                "--data",
                "data/digits",
                "--samples",
                samples,
                "--set",
                "eval.max_images=8",
                "--set",
                "eval.straightness_samples=0",
            ],
        ):
            subprocess.run([PY, "-m", *argv, "--no-mlflow"], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--points", default="euler:2,euler:4,heun2:2,heun2:4")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--actors", default="1,2", help="the sweep's actors per stage, each timed once after the A/B runs")
    a = p.parse_args(argv)
    points = [(s, int(k)) for s, k in (item.split(":") for item in a.points.split(","))]
    # the sweep runs every solver at every step count: give a full grid so both sides score the same points
    grid = {(s, k) for s in {s for s, _ in points} for k in {k for _, k in points}}
    if grid != set(points):
        raise SystemExit("--points must be a full grid of solvers x steps, e.g. euler:2,euler:4,heun2:2,heun2:4")
    from pipelines.chain import ensure_ingested

    ensure_ingested("digits", "data/digits")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint or _train(tmp)
        _sweep(ckpt, points, a.num_samples, f"{tmp}/warm", "warm")  # the classifier and reference statistics
        sweep_s, separate_s = [], []
        for r in range(a.repeats):
            sweep_s.append(_sweep(ckpt, points, a.num_samples, f"{tmp}/sweeps", f"s{r}"))
            separate_s.append(_separate(ckpt, points, a.num_samples, f"{tmp}/separate{r}"))
        by_actors = {
            int(k): round(_sweep(ckpt, points, a.num_samples, f"{tmp}/actors", f"a{k}", int(k)), 1)
            for k in a.actors.split(",")
        }
    per_hour = lambda secs: [round(3600 * len(points) / s, 1) for s in secs]  # noqa: E731
    result = {
        "points": len(points),
        "num_samples": a.num_samples,
        "sweep_s": [round(s, 1) for s in sweep_s],
        "separate_s": [round(s, 1) for s in separate_s],
        "sweep_points_per_hour": per_hour(sweep_s),
        "separate_points_per_hour": per_hour(separate_s),
        "ratio": round(sum(separate_s) / sum(sweep_s), 2),
        "sweep_s_by_actors": by_actors,
        "checkpoint": a.checkpoint or "trained here (100 steps)",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
