"""The `flowray` command: one entry point for every job, with the jobs' own flags.

    flowray COMMAND [flags]        (flowray COMMAND --help for the command's flags)

Each command is the job of the same name (`python -m jobs.COMMAND` works the same): input errors end it with a
message on stderr and exit status 2, SIGINT / SIGTERM with what was kept and 130 / 143.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it does, an example)
COMMANDS = {
    "ingest": (
        "jobs.ingest",
        "a source -> sharded parquet with a manifest (Ray Data tasks)",
        "flowray ingest --source fashion-mnist --out data/fashion-mnist",
    ),
    "train": (
        "jobs.train",
        "Ray Train (DDP workers) on the shards, logged to MLflow",
        "flowray train --config configs/digits-cpu.yaml --set train.steps=600",
    ),
    "ema": (
        "jobs.ema",
        "post-hoc EMA: a run's EMA snapshots -> checkpoints of other EMA lengths (EDM2)",
        "flowray ema --run outputs/ray_results/digits-cpu --sigma-rel 0.03,0.08",
    ),
    "sweep": (
        "jobs.sweep",
        "a grid of training configs on Ray Tune (ASHA optional), nested MLflow runs",
        "flowray sweep --config configs/digits-cpu.yaml --name lr --param optim.lr=2e-3,5e-4 --seeds 0,1",
    ),
    "sample": (
        "jobs.sample",
        "samples from a checkpoint on an actor pool, one parquet shard per block",
        "flowray sample --checkpoint runs:/RUN_ID --num-samples 10000 --out outputs/samples/run",
    ),
    "evaluate": (
        "jobs.evaluate",
        "bits/dim and sample quality (FID or FD, floor, KID, precision/recall)",
        "flowray evaluate --checkpoint runs:/RUN_ID --data data/digits --samples outputs/samples/run",
    ),
    "sample-sweep": (
        "jobs.sample_sweep",
        "models x samplers on the batch stage: quality against NFE, the Pareto front, the best per budget",
        "flowray sample-sweep --name s --data data/digits --checkpoint runs:/RUN_ID --grids uniform,edm",
    ),
    "reflow": (
        "jobs.reflow",
        "Rectified Flow's reflow: a model's own pairs -> the next model, evaluated per round",
        "flowray reflow --checkpoint runs:/RUN_ID --data data/digits --num-pairs 5000",
    ),
    "reflow-study": (
        "jobs.reflow_study",
        "trained flows against their reflows, and logit-normal t, at equal training steps",
        "flowray reflow-study --methods icfm,otcfm --reflow-from otcfm",
    ),
    "compare": (
        "jobs.compare",
        "the paper-style table and plot from an MLflow experiment",
        "flowray compare --experiment flowray-digits",
    ),
    "reproduce": (
        "jobs.reproduce",
        "the paper's comparison in miniature: methods x seeds through the chain",
        "flowray reproduce --preset digits --seeds 0,1",
    ),
    "demo": ("jobs.demo", "ingest -> train -> sample -> evaluate -> table on digits, on a local Ray", "flowray demo"),
    "toy2d": (
        "jobs.toy2d",
        "the fm core in process on a 2-D set: FM-OT against OT-CFM",
        "flowray toy2d --data checkerboard",
    ),
    "geometry": (
        "jobs.geometry",
        "Riemannian FM on S^2 and T^2, Action Matching on snapshots, in process",
        "flowray geometry --seeds 0",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: flowray COMMAND [flags]   (flowray COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what, _) in COMMANDS.items()]
    lines += ["", "examples:"] + [f"  {example}" for _, _, example in COMMANDS.values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    """Run `flowray COMMAND ...` in this process; returns the job's result (its last JSON line, as a dict)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flowray: unknown command {name!r}; commands: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    program = sys.argv[0]
    sys.argv[0] = f"flowray {name}"  # what argparse shows in the command's usage and errors
    try:
        return module.main(rest)
    finally:
        sys.argv[0] = program


def run() -> None:
    """The console script: exit status 0, or what the job ended with (2 on bad input)."""
    main()
