"""A million one-step samples on the batch stage, against a single-process loop on the same cores.

    python -m benchmarks.million_samples --checkpoint outputs/sweep-study/runs/meanflow-s0/checkpoint_… \
        [--num-samples 1000000] [--small 100000] [--baseline-samples 100000] [--block-size 1000] [--actors 2]

The checkpoint is a model sampled in jumps (a `meanflow` or `distill` model): every sample costs one network call
(`sample.solver=jump`, `sample.steps=1`). Measured, in this order:

1. the stage (`run_sampling`, `--actors` actors of one CPU each) on `--small` samples, then on `--num-samples`, each
   into a fresh folder, with the driver's peak resident memory during each (polled every 50 ms): flat in the count
   when nothing is buffered on the driver;
2. the same stage rerun on the million's folder: every block is found whole and kept (the resume of any sampling job);
3. the baseline: `Sampler.sample_block` called in a loop in this process with as many torch threads as the stage has
   actors (the same cores), the same blocks and shards, on `--baseline-samples` ids (its rate is steady from the
   first blocks on);
4. the million written rows: ids 0..N-1 once each, and the starting noise of every id (`sample_noise`, bit for bit what
   the sampler drew) distinct from every other's.

Prints one JSON object. Samples are written under a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch


class PeakRSS:
    """The peak resident memory of this process while the block runs (MiB), polled every 50 ms."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return round(self.peak / 2**20, 1)


def distinct_noises(seed: int, n: int, shape: list[int], chunk: int = 100_000) -> int:
    """How many distinct starting noises the ids 0..n-1 have (rows of the exact float32 bits, compared whole)."""
    from pipelines.core.samples import sample_noise

    width = int(np.prod(shape)) * 4
    rows = [
        np.ascontiguousarray(
            sample_noise(seed, np.arange(lo, min(lo + chunk, n)), shape).reshape(-1, width // 4).numpy()
        )
        .view(np.dtype((np.void, width)))
        .ravel()
        for lo in range(0, n, chunk)
    ]
    return len(np.unique(np.concatenate(rows)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model sampled in jumps (meanflow, distill)")
    p.add_argument("--num-samples", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=100_000, help="the first stage run, for the driver's memory")
    p.add_argument("--baseline-samples", type=int, default=100_000)
    p.add_argument("--block-size", type=int, default=1000)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from fm.methods import JUMP, METHODS
    from pipelines.batch.config import SampleConfig
    from pipelines.batch.sample import Sampler, run_sampling
    from pipelines.core.checkpoint import load_meta
    from pipelines.core.manifest import DataSpec
    from pipelines.core.samples import sample_shards

    meta = load_meta(a.checkpoint)
    if METHODS[meta.method_name].velocity_field:
        p.error(f"--checkpoint: {a.checkpoint} holds a {meta.method_name} model; this measures one-step jumps")
    data = DataSpec.from_dict(meta.manifest, "meta.json: manifest")
    layout, shape = ("HWC" if data.is_image else "D"), data.model_shape

    def cfg(n: int) -> SampleConfig:
        return SampleConfig(
            num_samples=n, solver=JUMP, steps=1, block_size=a.block_size, actors=a.actors, cpus_per_actor=1, seed=a.seed
        )

    out: dict = {"checkpoint": a.checkpoint, "method": meta.method_name, "block_size": a.block_size}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for n in (a.small, a.num_samples):
            with PeakRSS() as rss:
                r = run_sampling(a.checkpoint, Path(tmp) / f"stage-{n}", cfg(n))
            runs[n] = r
            out[f"stage_{n}"] = {
                "wall_s": round(r.wall_s, 1),
                "samples_per_s": round(r.samples_per_s or 0, 1),
                "samples_per_actor_s": round(r.samples_per_actor_s or 0, 1),
                "mean_nfe": r.mean_nfe,
                "driver_peak_rss_mib": rss.mib,
            }
        million = runs[a.num_samples]
        resumed = run_sampling(a.checkpoint, million.out, cfg(a.num_samples))
        out["resume"] = {"blocks_reused": resumed.blocks_reused, "blocks": resumed.blocks, "wall_s": resumed.wall_s}
        import ray

        ray.shutdown()  # the loop runs alone on the cores

        torch.set_num_threads(a.actors)  # the stage's cores, one loop
        base_out = Path(tmp) / "base"
        base_out.mkdir()
        sampler = Sampler(a.checkpoint, str(base_out), cfg(a.baseline_samples), shape, layout)
        sampler.sample_block(0)  # warm-up, as an actor's first call
        blocks = -(-a.baseline_samples // a.block_size)
        start = time.perf_counter()
        for b in range(blocks):
            sampler.sample_block(b)
        base = a.baseline_samples / (time.perf_counter() - start)
        out["baseline_samples_per_s"] = round(base, 1)
        out["ratio_stage_wall_to_loop"] = round((million.samples_per_s or 0) / base, 3)
        out["ratio_stage_steady_to_loop"] = round((million.samples_per_actor_s or 0) * a.actors / base, 3)

        import pyarrow.parquet as pq

        shards, count, _ = sample_shards(million.out)
        ids = np.concatenate([pq.read_table(s, columns=["id"])["id"].to_numpy() for s in shards])
        out["rows"] = count
        out["ids_each_once"] = bool(len(ids) == a.num_samples and np.array_equal(np.sort(ids), np.arange(len(ids))))
        start = time.perf_counter()
        out["distinct_starting_noises"] = distinct_noises(a.seed, a.num_samples, shape)
        out["distinct_check_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
