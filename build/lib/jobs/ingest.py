"""Ingest a dataset into sharded parquet with a manifest.

    python -m jobs.ingest --source SPEC --out DIR [--resolution N [--transform center-crop|resize]]
                          [--channels 1|3] [--shards N] [--max-rows-per-shard N] [--parallelism N]
                          [--test-fraction F] [--seed S] [--max-bad-fraction F] [--max-pixels N]

SPEC: digits | fashion-mnist[:DIR] | idx:DIR | folder:DIR | parquet:GLOB | npz:FILE | toy2d:NAME | imagenet:DIR |
tar:GLOB | manifold:NAME (vmf-mixture on S^2, dihedral on T^2) | snapshots:NAME (rotating-gmm, translation, ou:
unpaired samples at 5 observed times, labelled by time index). Runs on Ray Data (a local Ray, or the cluster
under `ray job submit`): parts of the source are read, decoded, converted, resized and written as parquet shards
by parallel tasks; the train/test split is by a hash of each row's id, so the output does not depend on the
parallelism. The last stdout line is one JSON object: output
dir, shape, counts per split, quarantined rows, mode conversions.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, run_job
from pipelines.ingest.sources import SOURCES


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--source",
        required=True,
        metavar="SPEC",
        help="one of: " + ", ".join(source.usage(kind) for kind, source in SOURCES.items()),
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--resolution",
        "--image-size",
        dest="resolution",
        type=int,
        default=None,
        help="H = W of every row (default: the first image's)",
    )
    p.add_argument(
        "--transform",
        default=None,
        choices=["center-crop", "resize"],
        help="resize images of another size (Lanczos): shorter side then centre square, or stretch; "
        "without it they are quarantined",
    )
    p.add_argument("--channels", type=int, default=None, help="1 or 3 (default: the source's)")
    p.add_argument("--shards", type=int, default=4, help="parts (shards per split) at least")
    p.add_argument("--max-rows-per-shard", type=int, default=20_000)
    p.add_argument("--parallelism", type=int, default=None, help="parts at once (default: the cluster's CPUs)")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="accept a source without labels (the manifest says unlabelled; no class conditioning)",
    )
    p.add_argument(
        "--manifold",
        default=None,
        help="point rows lie on this manifold (sphere2, torus2, ...): recorded in the manifest, rows off "
        "it quarantined",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="quarantine encoded images that decode to more pixels, undecoded (default: PIL's "
        "decompression-bomb limit, 89,478,485)",
    )
    add_common(p, tracking=False, overrides=False)
    a = p.parse_args(argv)
    return run_job("ingest", a, lambda: _ingest(a))


def _ingest(a) -> dict:
    from pipelines.ingest.run import ingest

    res = ingest(
        a.source,
        a.out,
        a.shards,
        a.test_fraction,
        a.seed,
        a.channels,
        a.resolution,
        a.max_bad_fraction,
        transform=a.transform,
        parallelism=a.parallelism,
        max_rows_per_shard=a.max_rows_per_shard,
        unlabelled=a.unlabelled,
        manifold=a.manifold,
        **({"max_pixels": a.max_pixels} if a.max_pixels is not None else {}),
    )
    m = res.manifest
    for q in m["quarantine"][:20]:
        print(f"quarantined {q['id']}: {q['reason']}")
    if m["quarantined"] > 20:
        print(f"... and {m['quarantined'] - 20} more quarantined rows: see {res.out}/manifest.json")
    for q in m["ignored"][:5]:
        print(f"ignored {q['id']}: {q['reason']}")
    if len(m["ignored"]) > 5:
        print(f"... and {len(m['ignored']) - 5} more ignored entries: see {res.out}/manifest.json")
    summary = {
        "out": str(res.out),
        "source": m["source"],
        "shape": m["shape"],
        "num_classes": m["num_classes"],
        "counts": {s: v["count"] for s, v in m["splits"].items()},
        "quarantined": m["quarantined"],
        "ignored": len(m["ignored"]),
        "labels": "labelled" if m["labelled"] else "unlabelled",
        "resized": m["resized"],
        "conversions": m["conversions"],
        **{k: m[k] for k in ("manifold", "times") if k in m},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
