"""Sources that generate or load their rows in process: scikit-learn's digits, the 2-D toy sets, points on a
manifold, and snapshots of a known dynamics (`fm.dynamics`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipelines.ingest.parts import IngestError, Listing, ListRequest, Part, Record, part_count, row_ranges

TOY_ROWS = 20_000
SNAPSHOT_ROWS = 4_000  # per observed time


def list_digits(req: ListRequest) -> Listing:
    n = 1797
    parts = [
        Part(0, "digits", {"start": a, "stop": b}, b - a)
        for a, b in row_ranges(n, part_count(n, req.min_parts, req.max_rows))
    ]
    return Listing(req.spec, req.kind, parts, [str(i) for i in range(10)], element_shape=(8, 8))


def read_digits(start: int, stop: int) -> Iterator[Record]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16: map to the 8-bit range
    for i in range(start, stop):
        yield Record(f"digits-{i}", int(d.target[i]), array=images[i])


def list_toy(req: ListRequest) -> Listing:
    from fm.data import TOY_SETS

    if req.arg not in TOY_SETS:
        raise IngestError(f"unknown toy2d set {req.arg!r}; allowed: {', '.join(TOY_SETS)}")
    parts = [
        Part(0, "toy2d", {"name": req.arg, "start": a, "stop": b}, b - a)
        for a, b in row_ranges(TOY_ROWS, part_count(TOY_ROWS, req.min_parts, req.max_rows))
    ]
    return Listing(req.spec, req.kind, parts, element_shape=(2,), points=True)


def read_toy(name: str, start: int, stop: int) -> Iterator[Record]:
    import torch

    from fm.data import sample_toy

    points = sample_toy(name, TOY_ROWS, torch.Generator().manual_seed(0)).numpy()  # 20k points: cheap to redraw
    for i in range(start, stop):
        yield Record(f"{name}-{i}", 0, array=points[i])


def list_manifold(req: ListRequest) -> Listing:
    from fm.manifold_data import MANIFOLD_SETS, manifold_of

    if req.arg not in MANIFOLD_SETS:
        raise IngestError(f"unknown manifold set {req.arg!r}; allowed: {', '.join(MANIFOLD_SETS)}")
    parts = [
        Part(0, "manifold", {"name": req.arg, "start": a, "stop": b}, b - a)
        for a, b in row_ranges(TOY_ROWS, part_count(TOY_ROWS, req.min_parts, req.max_rows))
    ]
    return Listing(
        req.spec,
        req.kind,
        parts,
        element_shape=(manifold_of(req.arg).ambient_dim,),
        points=True,
        manifold=MANIFOLD_SETS[req.arg],
    )


def read_manifold(name: str, start: int, stop: int) -> Iterator[Record]:
    import torch

    from fm.manifold_data import sample_manifold_set

    points = sample_manifold_set(name, TOY_ROWS, torch.Generator().manual_seed(0)).numpy()
    for i in range(start, stop):
        yield Record(f"{name}-{i}", 0, array=points[i])


def list_snapshots(req: ListRequest) -> Listing:
    from fm.dynamics import DYNAMICS, OBSERVED_TIMES

    if req.arg not in DYNAMICS:
        raise IngestError(f"unknown dynamics {req.arg!r}; allowed: {', '.join(DYNAMICS)}")
    n = SNAPSHOT_ROWS * len(OBSERVED_TIMES)
    parts = [
        Part(0, "snapshots", {"name": req.arg, "start": a, "stop": b}, b - a)
        for a, b in row_ranges(n, part_count(n, req.min_parts, req.max_rows))
    ]
    return Listing(
        req.spec,
        req.kind,
        parts,
        [f"t={t}" for t in OBSERVED_TIMES],
        element_shape=(DYNAMICS[req.arg].dim,),
        points=True,
        times=list(OBSERVED_TIMES),
    )


def read_snapshots(name: str, start: int, stop: int) -> Iterator[Record]:
    import torch

    from fm.dynamics import snapshots

    x, _ = snapshots(name, SNAPSHOT_ROWS, generator=torch.Generator().manual_seed(0))
    times = len(x) // SNAPSHOT_ROWS
    # rows interleave the observed times (t_0, t_1, ..., t_K, t_0, ...): the training stream reads rows in order, and
    # every batch needs rows of consecutive times to pair
    for i in range(start, stop):
        k, j = i % times, i // times
        yield Record(f"{name}-t{k}-{j}", k, array=x[k * SNAPSHOT_ROWS + j].numpy())
