"""What a fresh Ray worker process pays to import the module it runs, with POT and torchdiffeq imported where they
are used (`fm.couplings`, `fm.metrics`, `fm.solvers`, `fm.likelihood`) against importing both first, as `fm` did
at its top before, side by side in one run.

    python -m benchmarks.worker_imports [--repeats 5]

Each Ray Data task worker, Train worker and actor process imports its module once at start; a local cluster and a
test start dozens. Every measurement is a fresh interpreter (`python -c "import ..."`), wall time of the whole
process; the settings alternate so that drift of a shared host falls on both. Prints one JSON object: the median
seconds of each module under each setting, and their ratio (eager / lazy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# the module each kind of worker process imports to run its function, and what it still imports by the end of its
# first call (a sampling actor and a Train worker that draws sample grids solve an ODE: they pay torchdiffeq later;
# an OT-CFM pairing task pays POT: for these only the rest is saved)
MODULES = {
    "stream pairing task, independent coupling": ("pipelines.train.stream", ""),
    "stream pairing task, exact OT coupling": ("pipelines.train.stream", "ot"),
    "Train worker drawing sample grids": ("pipelines.train.worker", "torchdiffeq"),
    "sampling actor": ("pipelines.batch.sample", "torchdiffeq"),
}


def seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    floor = statistics.median(seconds("import torch") for _ in range(max(1, args.repeats // 2) + 1))
    times: dict[str, dict[str, list[float]]] = {k: {"lazy": [], "eager": []} for k in MODULES}
    for _ in range(args.repeats):
        for kind, (module, used) in MODULES.items():
            times[kind]["lazy"].append(seconds(f"import {module}" + (f"; import {used}" if used else "")))
            times[kind]["eager"].append(seconds(f"import ot, torchdiffeq; import {module}"))
    result = {}
    for kind, t in times.items():
        lazy, eager = statistics.median(t["lazy"]), statistics.median(t["eager"])
        result[kind] = {
            "module": MODULES[kind][0],
            "lazy_s": round(lazy, 3),
            "eager_s": round(eager, 3),
            "eager_over_lazy": round(eager / lazy, 3),
        }
    out = {
        "benchmark": "worker_imports",
        "repeats": args.repeats,
        "import_torch_alone_s": round(floor, 3),
        "results": result,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
