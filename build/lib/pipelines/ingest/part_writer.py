"""One part of an ingest, in a Ray task: read its records, convert, resize and validate each (`pipelines.ingest.rows`),
split them by id hash, and stream each split's rows into its own parquet shard in the staging folder. The driver
(`pipelines.ingest.run`) gathers the parts' summaries into the manifest."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines.core import storage
from pipelines.core.manifest import SCHEMA, row_format, sha256, shard_schema
from pipelines.ingest.parts import Part
from pipelines.ingest.rows import Settings, prepare, split_of
from pipelines.ingest.sources import read_part

if TYPE_CHECKING:
    import pyarrow.parquet as pq


class _ShardWriter:
    """Streams one split's rows of one part into staging/<split>-<part>-of-<parts>.parquet, a row group at a time."""

    def __init__(self, s: Settings, split: str, part: int, shape: tuple[int, ...]):
        self.name = f"{split}-{part:05d}-of-{s.num_parts:05d}.parquet"
        self.path = storage.join(s.staging, self.name)
        self.file = s.file_prefix + self.name
        self.schema = shard_schema(row_format("points" if s.points else "image", list(shape)), split)
        self.writer: pq.ParquetWriter | None = None
        self.rows, self.group_rows = 0, s.group_rows
        self.buffer: list[tuple[str, int, bytes]] = []

    def add(self, rid: str, label: int, cell: bytes) -> None:
        self.buffer.append((rid, label, cell))
        if len(self.buffer) >= self.group_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        ids, labels, cells = zip(*self.buffer, strict=True)
        table = pa.table({"id": list(ids), "label": list(labels), "image": list(cells)}, schema=SCHEMA)
        if self.writer is None:
            self.writer = storage.parquet_writer(self.path, self.schema)
        self.writer.write_table(table)
        self.rows += len(self.buffer)
        self.buffer = []

    def close(self) -> dict | None:
        self.flush()
        if self.writer is None:
            return None
        self.writer.close()
        return {"file": self.file, "rows": self.rows, "sha256": sha256(self.path)}


def ingest_part(part: Part, s: Settings) -> dict:
    """Read, convert, validate and write one part; returns its summary (shards, counts, quarantine)."""
    writers: dict[str, _ShardWriter] = {}
    conversions: Counter[str | None] = Counter()
    quarantine, resized, rows, labels, shape = [], 0, 0, set(), None
    for record in read_part(part):
        rows += 1
        try:
            arr, conversion, was_resized = prepare(record, s)
            if record.label < 0:
                raise ValueError(f"label {record.label} is negative")
        except ValueError as err:
            quarantine.append({"id": record.id, "reason": str(err)})
            continue
        if s.points and shape is not None and tuple(arr.shape) != shape:
            quarantine.append({"id": record.id, "reason": f"point has shape {list(arr.shape)}, expected {list(shape)}"})
            continue
        shape = tuple(arr.shape)
        conversions[conversion] += conversion is not None
        resized += was_resized
        labels.add(record.label)
        split = split_of(record, s)
        if split not in writers:
            writers[split] = _ShardWriter(s, split, part.index, shape)
        writers[split].add(record.id, record.label, arr.tobytes())
    shards = {split: w.close() for split, w in writers.items()}
    return {
        "part": part.index,
        "rows": rows,
        "quarantine": quarantine,
        "shards": shards,
        "conversions": {k: v for k, v in conversions.items() if k and v},
        "resized": resized,
        "max_label": max(labels) if labels else -1,
        "shape": list(shape) if shape else None,
    }


def ingest_batch(batch: dict, settings: Settings) -> dict:
    """Ray Data map_batches task: parts (JSON, one per row of the listing dataset) -> their summaries (JSON)."""
    out = []
    for text in batch["part"]:
        p = json.loads(text)
        out.append(json.dumps(ingest_part(Part(p["index"], p["source"], p["args"], p["rows"]), settings)))
    return {"summary": np.array(out, dtype=object)}
