"""The sample-quality feature stage: driver memory against the number of samples, and Inception throughput.

    python -m benchmarks.feature_stage memory [--sizes 5000,200000] [--hoard]
    python -m benchmarks.feature_stage inception [--images 512 --threads CORES --batch 64]
    python -m benchmarks.feature_stage pool [--sizes 356,5000,50000 --repeats 3 --nice 0]

memory: for each size, a fresh process writes that many random 8x8 digit-shaped samples as sampling shards (blocks
of 1,000) and runs `pipelines.batch.features.feature_stage` with the digits classifier's features (1 actor); its peak
RSS (ru_maxrss) is reported, and the growth from the smallest to the largest size in MB. Goal: at most 20 MB, where
keeping every feature row in the driver would add 100 MB (195,000 more rows x 128 float32) and more for its
copies. `--hoard` patches the stage to keep every row (as arrival-order code did), to show the goal catches it.
inception: the same images through the Inception-v3 network in this process (baseline: `inception_features` in a
loop over batches, with every core's thread) and through the Ray Data actor stage at its defaults (`eval.actors`
auto, `eval.cpus_per_actor` 0.5, the same batch). Both rates are wall time from the first feature batch to the
last, so neither counts its start-up (for the stage: Ray, the actors, the network load; reported apart). Prints one
JSON object.
pool: the classifier's features on an actor pool against Ray Data tasks, end to end, start-up included (what a caller
waits for): for each size, random 8x8 samples through `feature_stage` with the digits classifier at batches of 64
and the auto pool size (2 on two cores), `pool="actors"` and `pool="tasks"` alternating, `--repeats` times each on
one local Ray; medians of the wall times. `--nice 19`: both at the scorer's priority (`train.eval_nice`), where the
tasks run on Ray workers of that priority only (`pipelines.core.runtime.nice_args`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_samples(directory: Path, n: int, shape: tuple[int, ...] = (8, 8, 1), block: int = 1000) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.core.samples import SAMPLE_SCHEMA

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for b, start in enumerate(range(0, n, block)):
        ids = np.arange(start, min(start + block, n))
        images = rng.integers(0, 256, (len(ids), *shape), dtype=np.uint8)
        table = pa.table(
            {
                "id": ids,
                "seed": ids,
                "label": np.full(len(ids), -1),
                "nfe": np.ones(len(ids), int),
                "image": [im.tobytes() for im in images],
            },
            schema=SAMPLE_SCHEMA,
        )
        path = directory / f"block-{b:08d}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
    return paths


def _memory_child(n: int, shards: str, out: str, hoard: bool) -> None:
    """One measurement in a fresh process: peak RSS of the driver after the stage over n samples."""
    from pipelines.batch import features
    from pipelines.batch.config import EvalConfig
    from pipelines.batch.features import feature_stage
    from pipelines.batch.quality import feature_net
    from pipelines.core.manifest import Manifest

    if hoard:  # the broken variant the goal must catch: every row kept for the subset
        features.in_subset = lambda ids, rate: np.ones(len(ids), dtype=bool)

    manifest = Manifest.load(shards)
    net, _, _ = feature_net(manifest, EvalConfig(features="classifier", classifier_epochs=1))
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_samples(Path(tmp) / "s", n)
        start = time.perf_counter()
        res = feature_stage(paths, [8, 8, 1], net, n, batch_size=500, actors=1)
        wall = time.perf_counter() - start
    Path(out).write_text(
        json.dumps(
            {
                "n": res.n,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "wall_s": round(wall, 1),
                "subset": len(res.subset),
            }
        )
    )


def memory(sizes: list[int], hoard: bool = False) -> dict:
    from pipelines.chain import ensure_ingested

    shards = "data/digits"
    ensure_ingested("digits", shards)
    rows = []
    for n in sizes:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run(
                [sys.executable, "-m", "benchmarks.feature_stage", "_child", str(n), shards, f.name, str(int(hoard))],
                check=True,
            )
            rows.append(json.loads(Path(f.name).read_text()))
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    return {
        "features": "digits classifier",
        "hoard": hoard,
        "runs": rows,
        "peak_rss_growth_mb": round(growth, 1),
        "peak_rss_ratio": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3),
        "goal_met": growth <= 20,
    }


def inception(images: int, threads: int, batch: int) -> dict:
    import torch

    from fm.inception import inception_features, load_inception
    from pipelines.batch.features import FeatureNet, feature_stage

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_samples(Path(tmp) / "s", images, (32, 32, 3), block=batch)
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (images, 3, 32, 32), dtype=np.uint8))
        net = load_inception()
        inception_features(net, x[:batch], batch_size=batch)  # the first batch (TorchScript's profiling runs)
        start = time.perf_counter()
        inception_features(net, x[batch:], batch_size=batch)
        loop_rate = (images - batch) / (time.perf_counter() - start)
        del net
        start = time.perf_counter()
        res = feature_stage(paths, [32, 32, 3], FeatureNet("inception", "FID"), images, batch_size=batch)
        wall = time.perf_counter() - start
    return {
        "images": images,
        "batch": batch,
        "loop_threads": threads,
        "loop_images_per_s": round(loop_rate, 2),
        "stage_images_per_s": round(res.images_per_s, 2),
        "stage_wall_s": round(wall, 1),
        "ratio_stage_to_loop": round(res.images_per_s / loop_rate, 3),
    }


def pool(sizes: list[int], repeats: int, nice: int = 0) -> dict:
    from pipelines.batch.config import EvalConfig
    from pipelines.batch.features import feature_stage
    from pipelines.batch.quality import feature_net
    from pipelines.chain import ensure_ingested
    from pipelines.core.manifest import Manifest
    from pipelines.core.runtime import init_ray

    shards = "data/digits"
    ensure_ingested("digits", shards)
    net, _, _ = feature_net(Manifest.load(shards), EvalConfig(features="classifier", classifier_epochs=1))
    init_ray()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            paths = _write_samples(Path(tmp) / str(n), n)
            feature_stage(paths, [8, 8, 1], net, n, pool="actors", nice=nice)  # warm: the page cache
            walls: dict[str, list[float]] = {"actors": [], "tasks": []}
            for _ in range(repeats):
                for kind in walls:
                    start = time.perf_counter()
                    feature_stage(paths, [8, 8, 1], net, n, pool=kind, nice=nice)  # type: ignore[arg-type]
                    walls[kind].append(time.perf_counter() - start)
            med = {k: float(np.median(v)) for k, v in walls.items()}
            rows.append(
                {
                    "images": n,
                    "wall_s_actors": round(med["actors"], 2),
                    "wall_s_tasks": round(med["tasks"], 2),
                    "ratio_actors_to_tasks": round(med["actors"] / med["tasks"], 3),
                }
            )
    return {"features": "digits classifier", "nice": nice, "repeats": repeats, "sizes": rows}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _memory_child(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "inception", "pool"])
    p.add_argument("--sizes", default=None, help="memory: 5000,200000; pool: 356,5000,50000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hoard", action="store_true", help="memory: keep every feature row (the failure to catch)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--nice", type=int, default=0, help="pool: both pools at this OS priority (0 to 19)")
    a = p.parse_args()
    if a.what == "memory":
        out = memory([int(s) for s in (a.sizes or "5000,200000").split(",")], a.hoard)
    elif a.what == "pool":
        out = pool([int(s) for s in (a.sizes or "356,5000,50000").split(",")], a.repeats, a.nice)
    else:
        out = inception(a.images, a.threads, a.batch)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
