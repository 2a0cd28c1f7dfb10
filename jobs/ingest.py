"""Ingest a dataset into sharded parquet with a manifest.

    python -m jobs.ingest --source SPEC --out DIR [--shards N] [--test-fraction F] [--seed S]
                          [--channels 1|3] [--image-size N] [--max-bad-fraction F]

SPEC: digits | fashion-mnist[:DIR] | idx:DIR | folder:DIR | parquet:GLOB | npz:FILE | toy2d:NAME.
The last stdout line is one JSON object: output dir, shape, counts per split, quarantined rows.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_common, run_job


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    add_common(p, tracking=False, overrides=False)
    a = p.parse_args(argv)
    return run_job("ingest", a, lambda: _ingest(a))


def _ingest(a) -> dict:
    from pipelines.ingest import ingest

    res = ingest(a.source, a.out, a.shards, a.test_fraction, a.seed, a.channels, a.image_size, a.max_bad_fraction)
    m = res.manifest
    for q in m["quarantine"][:20]:
        print(f"quarantined {q['id']}: {q['reason']}")
    summary = {"out": str(res.out), "source": m["source"], "shape": m["shape"], "num_classes": m["num_classes"],
               "counts": {s: v["count"] for s, v in m["splits"].items()}, "quarantined": m["quarantined"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
