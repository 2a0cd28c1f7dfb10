"""The training stream (`pipelines.stream`): which rows each step reads, the pairs its CPU stage makes against an
independent in-process reference, and the same pairs through a real local Ray Data pipeline."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fm.couplings import ExactOTCoupling
from fm.data import to_model_space
from fm.methods import make_method
from fm.seeding import generator
from fm.training import pair_step
from pipelines.stream import PairSteps, StreamSpec, read_steps

FILE_ROWS = (40, 25, 35)  # 100 rows in 3 shards, row groups of 16: steps cross files and groups
SHAPE = (4, 4, 1)
SEED, DROPOUT, CLASSES = 7, 0.5, 10


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
        table = pa.table({"id": [str(i) for i in ids], "label": [i % CLASSES for i in ids],
                          "image": [_image(i).tobytes() for i in ids]})
        pq.write_table(table, d / f"part-{k}.parquet", row_group_size=16)
        files.append(str(d / f"part-{k}.parquet"))
        row += n
    return tuple(files)


def _spec(files, scope="local", hflip=False, method="otcfm", steps=20) -> StreamSpec:
    return StreamSpec(files, FILE_ROWS, SHAPE, "image", batch_size=8, world=2, steps=steps, seed=SEED, hflip=hflip,
                      method_kwargs={"name": method, "ot_scope": scope}, num_classes=CLASSES, label_dropout=DROPOUT,
                      keep_labels=False, cpus=0.25, tasks=1, prefetch_batches=2)


def _rows(step: int, rank: int, global_batch: bool = False) -> np.ndarray:
    """The split rows rank `rank` reads at `step`: 100 // 16 = 6 global batches per pass, in order."""
    start = (step % 6) * 16 + (0 if global_batch else rank * 8)
    return np.arange(start, start + (16 if global_batch else 8))


def test_each_step_reads_its_rows_across_shards_and_passes(shards):
    out = read_steps({"id": np.array([0, 1, 3, 4, 5])}, _spec(shards), rank=1, first_step=2)
    assert out["step"].tolist() == [2, 3, 5, 6, 7]
    for k, step in enumerate(out["step"]):
        assert out["raw"][k][:, 0].tolist() == _rows(step, 1).tolist()  # step 6 wraps to the first rows
        assert out["label"][k].tolist() == (_rows(step, 1) % CLASSES).tolist()
    both = read_steps({"id": np.array([4])}, _spec(shards, "global"), rank=0, first_step=0)
    assert both["raw"][0][:, 0].tolist() == _rows(4, 0, global_batch=True).tolist()  # rows 64-79: two shards


def test_only_an_exact_ot_method_reads_the_global_batch_for_one_plan(shards):
    assert _spec(shards, "global").parts(1) == [0, 1]
    assert _spec(shards, "global", method="icfm").parts(1) == [1]  # the scope means nothing to it
    assert _spec(shards, "global", method="sbcfm").parts(1) == [1]
    assert _spec(shards, "global", method="am").parts(1) == [1]  # snapshot pairs stay within a worker's batch
    assert _spec(shards, "local").parts(1) == [1]


def test_a_row_of_the_wrong_size_is_named(tmp_path, shards):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["0"] * 40, "label": [0] * 40, "image": [b"\x00" * 16] * 39 + [b"\x00" * 3]}), bad)
    spec = replace(_spec(shards), files=(str(bad), *shards[1:]))
    with pytest.raises(ValueError, match=r"bad.parquet: row 39 has 3 bytes; a row of shape \[4, 4, 1\] \(image\) "
                                         r"has 16; re-ingest the data"):
        read_steps({"id": np.array([2])}, spec, rank=0, first_step=0)


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


def _stage_pairs(spec: StreamSpec, rank: int, step: int):
    rec = read_steps({"id": np.array([step])}, spec, rank, first_step=0)
    return PairSteps(spec, rank).pair(step, rec["raw"][0], rec["label"][0])


@pytest.mark.parametrize("method", ["otcfm", "sbcfm", "icfm"])
def test_the_stage_pairs_a_step_as_pair_step_does_in_process(shards, method):
    spec = _spec(shards, hflip=True, method=method)
    for rank, step in [(0, 0), (1, 9)]:
        got = _stage_pairs(spec, rank, step)
        rows = _rows(step, rank)
        x_1 = _reference_x1(step, rank, rows, hflip=True)
        assert not torch.equal(x_1, _reference_x1(step, rank, rows, hflip=False))  # some rows were flipped
        want = pair_step(make_method(method), x_1, _reference_y(step, rank, rows), generator(SEED, rank, step))
        for a, b in [(got.x_0, want.x_0), (got.x_1, want.x_1), (got.y, want.y)]:
            assert torch.equal(a, b)
        # the loss continues from the generator where the pairing left it
        assert torch.equal(torch.rand(5, generator=got.generator), torch.rand(5, generator=want.generator))


def test_the_global_plan_is_one_exact_plan_over_every_ranks_batch_split_by_rank(shards):
    spec, step = _spec(shards, "global"), 4
    rows = _rows(step, 0, global_batch=True)
    x_1 = torch.cat([_reference_x1(step, r, rows[r * 8:(r + 1) * 8], False) for r in range(2)])
    y = torch.cat([_reference_y(step, r, rows[r * 8:(r + 1) * 8]) for r in range(2)])
    x_0 = torch.cat([torch.randn(8, 1, 4, 4, generator=generator(SEED, r, step)) for r in range(2)])
    _, ref_x1, ref_y = ExactOTCoupling()(x_0, x_1, y)
    got = [_stage_pairs(spec, r, step) for r in range(2)]
    assert torch.equal(torch.cat([p.x_0 for p in got]), x_0)
    assert torch.equal(torch.cat([p.x_1 for p in got]), ref_x1)
    assert torch.equal(torch.cat([p.y for p in got]), ref_y)
    # every row of the global batch is someone's partner exactly once
    assert sorted(torch.cat([p.x_1[:, 0, 0, 0] for p in got]).tolist()) == sorted(x_1[:, 0, 0, 0].tolist())


@pytest.mark.timeout(300)
def test_a_real_ray_data_stream_gives_the_in_process_pairs_in_order_from_any_step(shards):
    import ray

    from pipelines.runtime import init_ray
    from pipelines.stream import iter_pairs

    init_ray()
    try:
        for scope, rank, first in [("local", 1, 3), ("global", 0, 15)]:
            spec = _spec(shards, scope, hflip=True, steps=20)
            got = list(iter_pairs(spec, rank, first, torch.device("cpu")))
            assert [step for step, _ in got] == list(range(first, 20))
            for step, pairs in got:
                want = _stage_pairs(spec, rank, step)
                for a, b in [(pairs.x_0, want.x_0), (pairs.x_1, want.x_1), (pairs.y, want.y)]:
                    assert torch.equal(a, b)
                assert torch.equal(pairs.generator.get_state(), want.generator.get_state())
    finally:
        ray.shutdown()
