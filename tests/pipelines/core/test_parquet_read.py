"""Reading the project's parquet through Ray Data (`pipelines.core.runtime.read_parquet`): Ray's footer-reading pool
sized to the files, not 32 actors a read (the time it saves is measured in BENCHMARKS.md, not here)."""

import os

import pyarrow.parquet as pq

from pipelines.core.manifest import Manifest
from pipelines.core.runtime import footer_actors, read_parquet


def test_one_footer_reader_per_batch_of_ten_files_at_most_rays_32(monkeypatch):
    assert [footer_actors(n) for n in (0, 1, 2, 10, 11, 95, 320, 10_000)] == [1, 1, 1, 1, 2, 10, 32, 32]
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_BATCH_SIZE", "4")  # Ray's batch of footers, where a user sets it
    assert [footer_actors(n) for n in (4, 5, 9)] == [1, 2, 3]


def test_a_read_of_two_shards_builds_a_pool_of_one_footer_reader_and_reads_every_row(digits, ray_local, monkeypatch):
    """The pool is what Ray's reader was built with, seen on its file indexer as the read builds it. Its processes
    are no measure: on a quiet machine the first actor answers before the others have started; on a busy one (a
    Train run scoring while it trains) 5 to 9 of them started for a read of two files."""
    from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer

    pools = []
    build = footer_file_indexer.FooterFileIndexer.__init__

    def recording(self, *args, **kwargs):
        build(self, *args, **kwargs)
        pools.append(self._num_actors)

    monkeypatch.setattr(footer_file_indexer.FooterFileIndexer, "__init__", recording)
    shards = Manifest.load(digits).shard_paths("train")
    assert len(shards) == 2
    ds = read_parquet(shards)
    assert pools == [1] and "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in os.environ  # set for this read only
    ids = ds.select_columns(["id"]).to_pandas()["id"].tolist()
    assert sorted(ids) == sorted(i for p in shards for i in pq.read_table(p, columns=["id"])["id"].to_pylist())

    # a size the user set is theirs: used, and left set
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "3")
    assert read_parquet(shards).count() == len(ids)
    assert pools == [1, 3] and os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "3"
