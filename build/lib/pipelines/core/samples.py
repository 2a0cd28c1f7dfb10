"""The sample-shard contract between sampling and evaluation: one parquet object per block of sample ids
(`block-XXXXXXXX.parquet`, schema `SAMPLE_SCHEMA`), the settings they were made with (`_sampling.json`) and the MLflow
run that logged them (`_mlflow.json`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fm.seeding import SeedStack, derive_seed
from pipelines.core import storage
from pipelines.core.errors import ConfigError

SAMPLE_SCHEMA = pa.schema(
    [("id", pa.int64()), ("seed", pa.int64()), ("label", pa.int64()), ("nfe", pa.int64()), ("image", pa.binary())]
)
SETTINGS = "_sampling.json"  # the settings a sampling output was made with
RUN_FILE = "_mlflow.json"  # the MLflow run that logged it: {"run_id", "tracking_uri"}
SHARD_PREFIX, SHARD_SUFFIX = "block-", ".parquet"


class SamplingError(ConfigError):
    """Bad sampling request or output directory."""


@dataclass
class SamplingResult:
    """What a sampling job made: where, how many blocks were new, NFE and throughput, and its MLflow runs."""

    out: str  # the output location (absolute when local)
    num_samples: int
    blocks: int
    blocks_reused: int  # blocks a rerun found whole and kept
    blocks_sampled: int
    wall_s: float
    mean_nfe: float | None = None  # None when every block was reused
    max_nfe: int | None = None
    samples_per_s: float | None = None  # wall-clock rate of the stage
    samples_per_actor_s: float | None = None  # rate per second of actor busy time
    train_run_id: str | None = None  # the MLflow run that trained the checkpoint
    mlflow_run_id: str | None = None  # the sampling run, once logged (`log_sampling_run`)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_seeds(seed: int, ids) -> list[int]:
    """The seed of each sample id's starting noise (recorded in its row): derive_seed(sample.seed, id)."""
    return [derive_seed(seed, int(i)) for i in ids]


def sample_noise(seed: int, ids, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """x_0 [len(ids), *shape] of sample ids `ids` of an output sampled with `seed`, on the CPU, bit for bit what the
    sampler drew (standard normal from each id's seed alone: `fm.seeding.SeedStack`)."""
    return SeedStack(sample_seeds(seed, ids)).randn(shape)


def block_ids(block: int, block_size: int, n: int) -> np.ndarray:
    return np.arange(block * block_size, min((block + 1) * block_size, n), dtype=np.int64)


def shard_name(block: int) -> str:
    return f"{SHARD_PREFIX}{block:08d}{SHARD_SUFFIX}"


def sample_shards(directory: str | Path) -> tuple[list[str], int, int]:
    """The shards of a sampling output (checked: its settings file and schema), the number of samples and the
    byte length of one image cell, without reading the images."""
    d = str(directory) if storage.is_uri(str(directory)) else str(Path(directory).resolve())
    if not storage.is_file(storage.join(d, SETTINGS)):
        raise SamplingError(f"{d} is not a sampling output: {SETTINGS} is missing")
    files = storage.list_files(d, SHARD_PREFIX, SHARD_SUFFIX)
    if not files:
        raise SamplingError(f"{d} holds no sample shards (block-*.parquet)")
    total = 0
    for f in files:
        meta = storage.parquet_footer(
            f,
            lambda why, f=f: SamplingError(
                f"{f}: not a readable sample shard (truncated or corrupt: {why}); rerun the sampling job with --out "
                f"{d}: it redoes every block that does not read back whole"
            ),
        )
        if not meta.schema.to_arrow_schema().equals(SAMPLE_SCHEMA):
            raise SamplingError(f"{f}: foreign schema {meta.schema.names}; expected {SAMPLE_SCHEMA.names}")
        total += meta.num_rows
    first = storage.read_table(files[0], ["image"])["image"][0].as_py()
    return files, total, len(first)


def mean_nfe(directory: str | Path) -> float:
    """The mean NFE per sample of a sampling output, from each row's `nfe` (its block's solve): the same whether
    the blocks were sampled now or by an earlier run into the folder."""
    paths, _, _ = sample_shards(directory)
    nfe = pa.concat_arrays([c for p in paths for c in storage.read_table(p, ["nfe"])["nfe"].chunks])
    return float(np.mean(nfe.to_numpy()))


def read_samples(directory: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """All samples of a sampling output in memory, as (ids [N], raw image bytes [N] objects, settings); for small
    outputs and tests (the evaluation streams shards through `pipelines.batch.features` instead)."""
    paths, _, _ = sample_shards(directory)
    table = pa.concat_tables([storage.read_table(p) for p in paths])
    return (
        np.asarray(table["id"].to_pylist()),
        np.asarray(table["image"].to_pylist(), dtype=object),
        sampling_settings(str(directory)),
    )


def sampling_settings(directory: str) -> dict:
    """The settings a sampling output was made with (its `_sampling.json`)."""
    return json.loads(storage.read_text(storage.join(str(directory), SETTINGS)))


def sampling_run_id(directory: str) -> str | None:
    """The MLflow run that logged a sampling output, when one did (its `_mlflow.json`)."""
    path = storage.join(str(directory), RUN_FILE)
    return json.loads(storage.read_text(path))["run_id"] if storage.is_file(path) else None
