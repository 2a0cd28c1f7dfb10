"""The training stream (`pipelines.train.stream`): which rows each step reads, the pairs its CPU stage makes against an
independent in-process reference, and the same pairs through a real local Ray Data pipeline."""

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fm.data import to_model_space
from fm.seeding import generator
from pipelines.core.checkpoint import CheckpointMeta
from pipelines.train.stream import PairSteps, StreamSpec, pass_order, read_steps, resume_position, stream_record

FILE_ROWS = (40, 25, 35)  # 100 rows in 3 shards, row groups of 16: steps cross files, groups and passes
GROUP_ROWS = ((16, 16, 8), (16, 9), (16, 16, 3))
SHAPE = (4, 4, 1)
SEED, DROPOUT, CLASSES = 7, 0.5, 10
N, B, WINDOW = 100, 16, 40  # rows, global batch (2 ranks of 8), rows shuffled together


def _image(row: int) -> np.ndarray:
    """Row `row`'s image: its index in the first pixel, a left-right ramp in the others (flips show)."""
    img = np.tile(np.arange(4, dtype=np.uint8) * 50, (4, 1))[..., None].copy()
    img[0, 0, 0] = row
    return img


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d, files, row = tmp_path_factory.mktemp("stream"), [], 0
    for k, n in enumerate(FILE_ROWS):
        ids = range(row, row + n)
        table = pa.table(
            {
                "id": [str(i) for i in ids],
                "label": [i % CLASSES for i in ids],
                "image": [_image(i).tobytes() for i in ids],
            }
        )
        pq.write_table(table, d / f"part-{k}.parquet", row_group_size=16)
        files.append(str(d / f"part-{k}.parquet"))
        row += n
    return tuple(files)


def _spec(files, scope="local", hflip=False, method="otcfm", steps=20, window=WINDOW) -> StreamSpec:
    return StreamSpec(
        files,
        GROUP_ROWS,
        SHAPE,
        "image",
        batch_size=8,
        world=2,
        steps=steps,
        seed=SEED,
        hflip=hflip,
        method_kwargs={"name": method, "ot_scope": scope},
        num_classes=CLASSES,
        label_dropout=DROPOUT,
        keep_labels=False,
        cpus=0.25,
        tasks=1,
        prefetch_batches=2,
        shuffle_window=window,
    )


def _groups() -> list[set[int]]:
    starts = np.cumsum([0, *(n for f in GROUP_ROWS for n in f)])
    return [set(range(a, b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_every_pass_visits_every_row_once_in_a_fresh_order_of_whole_row_groups(shards):
    spec = _spec(shards)
    orders = [pass_order(spec, p) for p in range(4)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(N))
    assert len({tuple(o) for o in orders}) == 4  # a fresh order each pass
    assert not np.array_equal(orders[0], np.arange(N))
    assert np.array_equal(pass_order(spec, 2), orders[2])  # from (seed, pass) alone
    assert not np.array_equal(pass_order(replace(spec, seed=SEED + 1), 0), orders[0])
    # a window holds whole row groups: some proper prefix of the order is a union of groups (a window's end)
    assert _window_ends(orders[0]) >= 2  # 100 rows in windows of >= 40 rows: at least one end before the last
    assert _window_ends(pass_order(_spec(shards, window=N), 0)) == 1  # one window: rows mixed across all groups


def _window_ends(order: np.ndarray) -> int:
    """How many prefixes of `order` are unions of whole row groups."""
    groups, seen, ends = _groups(), set(), 0
    for row in order.tolist():
        seen.add(row)
        ends += all(g <= seen or not (g & seen) for g in groups)
    return ends


def test_a_class_sorted_source_gives_batches_of_most_classes_at_the_default_window():
    # 60,000 rows sorted by class (6,000 each), row groups of 512 as ingest writes them: a window of 65,536 rows
    groups = tuple([tuple([512] * 117 + [96])])
    spec = StreamSpec(
        ("unused",), groups, SHAPE, "image", 64, 2, 10, 0, False, {"name": "icfm"}, 10, 0.0, False, 0.25, 1, 2
    )
    order = pass_order(spec, 0)
    classes = [len(np.unique(order[k : k + 128] // 6000)) for k in range(0, 60_000 - 128, 128)]
    assert np.mean(classes) >= 9.5


def test_steps_read_consecutive_positions_and_a_pass_rolls_into_the_next(shards):
    spec = _spec(shards)
    out = read_steps({"id": np.arange(14)}, spec, rank=1, first_step=0)
    both = [read_steps({"id": np.arange(14)}, spec, rank=r, first_step=0)["row"] for r in range(2)]
    seq = np.concatenate([np.concatenate([both[0][s], both[1][s]]) for s in range(14)])  # 14 steps x 16 rows
    want = np.concatenate([pass_order(spec, p) for p in range(3)])[: 14 * B]
    assert np.array_equal(seq, want)
    # step 6 reads the last 4 rows of pass 0 and the first 12 of pass 1: no row is skipped
    assert sorted(seq[:N].tolist()) == list(range(N))
    # each row's bytes and label are that row's
    assert np.array_equal(out["raw"][:, :, 0], out["row"])
    assert np.array_equal(out["label"], out["row"] % CLASSES)
    # a stream started later reads the same rows for the same steps (restarts)
    later = read_steps({"id": np.arange(3)}, spec, rank=1, first_step=11)
    assert np.array_equal(later["row"], out["row"][11:14])
    # the global plan's stream reads every rank's rows of the step, in rank order
    g = read_steps({"id": np.array([6])}, _spec(shards, "global"), rank=0, first_step=0)
    assert np.array_equal(g["row"][0], seq[6 * B : 7 * B])


def _rows_read(spec: StreamSpec, first: int, end: int) -> np.ndarray:
    """The split rows steps first..end-1 read, every rank's in rank order: in the order of their positions."""
    per_rank = [
        read_steps({"id": np.arange(end - first)}, spec, rank=r, first_step=first)["row"] for r in range(spec.world)
    ]
    return np.concatenate([np.concatenate([rows[k] for rows in per_rank]) for k in range(end - first)])


def _meta(fields: dict) -> CheckpointMeta:
    """A checkpoint's meta.json with these fields (the model and method are not read here)."""
    return CheckpointMeta.from_dict(
        {"model": {"name": "mlp", "kwargs": {}}, "method": {"name": "icfm"}, **fields}, "meta.json"
    )


def test_restarts_with_2_then_1_then_3_workers_read_every_row_of_every_pass_once(shards):
    # 2 workers for steps 0-8 (144 rows: pass 1 under way), 1 worker for steps 9-19 (88 rows), 3 workers for steps
    # 20-29 (240 rows), the last restart also widening the shuffle window (40 -> 100 rows): 472 rows, 4 whole passes
    two = _spec(shards, steps=30)
    read = [_rows_read(two, 0, 9)]
    meta = _meta({"step": 9, "stream": stream_record(two, 9), "config": {}})
    assert meta.stream == {"cursor": 144, "windows": [[0, WINDOW]]}
    one = resume_position(replace(two, world=1), meta)
    read.append(_rows_read(one, 9, 20))
    meta = _meta({"step": 20, "stream": json.loads(json.dumps(stream_record(one, 20))), "config": {}})  # as meta.json
    three = resume_position(replace(two, world=3, shuffle_window=N), meta)
    # the pass under way when the window changed (pass 2: rows 200-299) keeps its window; pass 3 on is ordered by N
    assert stream_record(three, 30) == {"cursor": 144 + 88 + 240, "windows": [[0, WINDOW], [3, N]]}
    read.append(_rows_read(three, 20, 30))
    seq = np.concatenate(read)
    assert len(seq) == 472
    for p in range(4):
        assert sorted(seq[p * N : (p + 1) * N].tolist()) == list(range(N)), f"pass {p}"
    assert np.array_equal(seq[200:300], pass_order(two, 2))  # the old window's order, to the end of its pass
    assert np.array_equal(seq[300:400], pass_order(replace(two, shuffle_window=N), 3))
    # a checkpoint from before the cursor was recorded: step x batch x its workers rows, its config's window
    old = _meta(
        {"step": 9, "config": {"ray": {"num_workers": 2}, "train": {"batch_size": 8}, "data": {"shuffle_window": 40}}}
    )
    assert resume_position(replace(two, world=1), old) == one
    # what the stream did before: step s read positions s x B, so 1 worker from step 9 re-read rows and skipped others
    naive = _rows_read(replace(two, world=1), 9, 20)
    assert sorted(np.concatenate([read[0], naive])[N : 2 * N].tolist()) != list(range(N))


def test_only_an_exact_ot_method_reads_the_global_batch_for_one_plan(shards):
    assert _spec(shards, "global").parts(1) == [0, 1]
    assert _spec(shards, "global", method="icfm").parts(1) == [1]  # the scope means nothing to it
    assert _spec(shards, "global", method="sbcfm").parts(1) == [1]
    assert _spec(shards, "global", method="am").parts(1) == [1]  # snapshot pairs stay within a worker's batch
    assert _spec(shards, "local").parts(1) == [1]


def test_a_row_of_the_wrong_size_is_named(tmp_path, shards):
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"id": ["0"] * 40, "label": [0] * 40, "image": [b"\x00" * 16] * 39 + [b"\x00" * 3]}),
        bad,
        row_group_size=16,
    )
    spec = replace(_spec(shards, window=N), files=(str(bad), *shards[1:]))
    with pytest.raises(
        ValueError,
        match=r"bad.parquet: row 39 has 3 bytes; a row of shape \[4, 4, 1\] \(image\) "
        r"has 16; re-ingest the data",
    ):
        read_steps({"id": np.arange(7)}, spec, rank=0, first_step=0)


# --- the pairs, against a reference written from the method's definition (not through fm.training) -------------


def _reference_x1(step: int, rank: int, rows: np.ndarray, hflip: bool) -> torch.Tensor:
    x = to_model_space(torch.from_numpy(np.stack([_image(r) for r in rows])).permute(0, 3, 1, 2))
    if hflip:  # the step's flips: derive_seed(seed, rank, step, 2)
        flip = torch.rand(len(rows), generator=generator(SEED, rank, step, 2)) < 0.5
        x[flip] = x[flip].flip(-1)
    return x


def _reference_y(step: int, rank: int, rows: np.ndarray) -> torch.Tensor:
    y = torch.from_numpy(rows % CLASSES)
    drop = torch.rand(len(rows), generator=generator(SEED, rank, step, 1)) < DROPOUT  # derive_seed(.., 1)
    return torch.where(drop, torch.full_like(y, CLASSES), y)


def _assignment(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """Exact OT between equal uniform batches: the permutation of least squared cost (scipy's Hungarian solver)."""
    cost = torch.cdist(x_0.flatten(1).double(), x_1.flatten(1).double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return torch.from_numpy(cols[np.argsort(rows)])


def _stage(spec: StreamSpec, rank: int, step: int):
    rec = read_steps({"id": np.array([step])}, spec, rank, first_step=0)
    return rec["row"][0], PairSteps(spec, rank).pair(step, rec["raw"][0], rec["label"][0])


@pytest.mark.parametrize("method", ["otcfm", "icfm"])
def test_the_stage_pairs_a_step_as_the_method_defines(shards, method):
    spec = _spec(shards, hflip=True, method=method)
    for rank, step in [(0, 0), (1, 9)]:
        rows, got = _stage(spec, rank, step)
        x_1 = _reference_x1(step, rank, rows, hflip=True)
        assert not torch.equal(x_1, _reference_x1(step, rank, rows, hflip=False))  # some rows were flipped
        y = _reference_y(step, rank, rows)
        g = generator(SEED, rank, step)
        x_0 = torch.randn(x_1.shape, generator=g)  # the step's noise, then the coupling (no draws for these two)
        j = _assignment(x_0, x_1) if method == "otcfm" else torch.arange(len(rows))
        for a, b in [(got.x_0, x_0), (got.x_1, x_1[j]), (got.y, y[j])]:
            assert torch.equal(a, b)
        # the loss continues from the generator where the pairing left it
        assert torch.equal(torch.rand(5, generator=got.generator), torch.rand(5, generator=g))


def test_the_global_plan_is_one_exact_plan_over_every_ranks_batch_split_by_rank(shards):
    spec, step = _spec(shards, "global"), 4
    rows = _stage(spec, 0, step)[0]
    x_1 = torch.cat([_reference_x1(step, r, rows[r * 8 : (r + 1) * 8], False) for r in range(2)])
    y = torch.cat([_reference_y(step, r, rows[r * 8 : (r + 1) * 8]) for r in range(2)])
    x_0 = torch.cat([torch.randn(8, 1, 4, 4, generator=generator(SEED, r, step)) for r in range(2)])
    j = _assignment(x_0, x_1)
    got = [_stage(spec, r, step)[1] for r in range(2)]
    assert torch.equal(torch.cat([p.x_0 for p in got]), x_0)
    assert torch.equal(torch.cat([p.x_1 for p in got]), x_1[j])
    assert torch.equal(torch.cat([p.y for p in got]), y[j])


@pytest.mark.timeout(300)
def test_a_real_ray_data_stream_gives_the_in_process_pairs_in_order_from_any_step(shards, monkeypatch, ray_local):
    """Read across chunks (the worker reads its stream as consecutive datasets): one step per task, three tasks per
    chunk in the first case, so steps 3..19 span six datasets, each started while the one before is read; one
    dataset for the whole run in the second (ray.stream_chunk_tasks=0)."""
    from pipelines.train import stream
    from pipelines.train.stream import iter_pairs

    for scope, rank, first, chunk_tasks, task_bytes in [("local", 1, 3, 3, 1), ("global", 0, 15, 0, 32 << 20)]:
        monkeypatch.setattr(stream, "BYTES_PER_TASK", task_bytes)
        spec = replace(_spec(shards, scope, hflip=True, steps=20), chunk_tasks=chunk_tasks)
        got = list(iter_pairs(spec, rank, first, torch.device("cpu")))
        assert [step for step, _ in got] == list(range(first, 20))
        for step, pairs in got:
            want = _stage(spec, rank, step)[1]
            for a, b in [(pairs.x_0, want.x_0), (pairs.x_1, want.x_1), (pairs.y, want.y)]:
                assert torch.equal(a, b)
            assert torch.equal(pairs.generator.get_state(), want.generator.get_state())
