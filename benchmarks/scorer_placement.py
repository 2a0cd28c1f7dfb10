"""Sample quality while training with the scorer on the trainers' node against on a node of its own
(`train.eval_resource`), on a simulated three-node cluster whose two worker nodes each own one of this machine's
cores.

    python -m benchmarks.scorer_placement [--steps 400] [--eval-every 100] [--eval-samples 200] [--eval-rows 64]

The cluster (`ray.cluster_utils.Cluster`): a head with no CPUs (the driver, Ray Train's controller), node A with
2 logical CPUs and the label `trainers`, node B with 2 logical CPUs and the label `scoring`. Each node's processes
are pinned to one core (the benchmark's own affinity when the node starts, which the raylet and its workers
inherit), so a node's work competes only with that node's work. The Train worker (1 worker, 1 CPU, 1 thread) is
held on node A (`ray.worker_resource=trainers`). Three runs of `benchmarks.quality_overhead`'s setup, one after
another: scoring off; the scorer and its stages on node A beside the trainer (`train.eval_resource=trainers`, at
`train.eval_nice`'s default 19, the case of a shared node); on node B (`train.eval_resource=scoring`). As there,
each run compares its windows while a score runs with those before the first scored checkpoint, and `*_vs_off` is
that ratio over the run without scoring (drift between runs cancels). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.quality_overhead import run


def _cluster():
    """The head (no CPUs) and the two labelled worker nodes, each pinned to a core of its own."""
    from ray.cluster_utils import Cluster

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("this benchmark needs two cores (one per worker node)")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for core, label in ((cores[0], "trainers"), (cores[1], "scoring")):
            os.sched_setaffinity(0, {core})  # the node's raylet and every worker it starts inherit this
            cluster.add_node(num_cpus=2, resources={label: 1})
    finally:
        os.sched_setaffinity(0, set(cores))
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--eval-rows", type=int, default=64)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from pipelines.ingest.run import ingest

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "digits"
        ingest("digits", shards, shards=4)
        ray.shutdown()  # the ingest's local Ray, before the cluster starts; every run joins the cluster
        cluster = _cluster()
        try:
            placed = [f"ray.address={cluster.address}", "ray.worker_resource=trainers"]
            scoring = [
                *placed,
                f"train.eval_every={a.eval_every}",
                f"train.eval_samples={a.eval_samples}",
                f"train.eval_rows={a.eval_rows}",
            ]
            off = run(shards, tmp, "off", a.steps, a.eval_every, placed)
            ray.shutdown()
            shared = run(shards, tmp, "shared", a.steps, a.eval_every, [*scoring, "train.eval_resource=trainers"])
            ray.shutdown()
            apart = run(shards, tmp, "apart", a.steps, a.eval_every, [*scoring, "train.eval_resource=scoring"])
            ray.shutdown()
        finally:
            cluster.shutdown()
    out = {"steps": a.steps, "eval_every": a.eval_every, "eval_samples": a.eval_samples, "eval_rows": a.eval_rows}
    out["off_images_per_s"] = round(off["images_per_s"], 1)
    out["off_during_over_before"] = round(off["during_over_before"], 3)
    for name, r in (("shared_node", shared), ("own_node", apart)):
        out[f"{name}_images_per_s"] = round(r["images_per_s"], 1)
        out[f"{name}_ratio"] = round(r["images_per_s"] / off["images_per_s"], 3)
        out[f"{name}_during_over_before"] = round(r["during_over_before"], 3)
        out[f"{name}_vs_off"] = round(r["during_over_before"] / off["during_over_before"], 3)
        out[f"{name}_scored_steps"] = r["scored_steps"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
