"""Rows of a split by index, read whole row groups at a time from its parquet shards (the `image` cell format of
`pipelines.core.cells`), for every stage that addresses rows by number: the training stream and evaluation's fixed
blocks.

The groups read are kept in this process, least recently used out past `cache_rows` rows, since consecutive requests
draw on the same groups and Ray runs a stage's tasks in the same worker processes.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from pipelines.core import storage
from pipelines.core.cells import row_bytes

_GROUPS: OrderedDict = OrderedDict()  # (file, stamp, group, what) -> (raw, labels) or (None, ids): this process's


def group_rows(files: list[str] | tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """The rows of each row group of each shard (local paths or object URIs), from the parquet footers."""
    out = []
    for f in files:
        meta = storage.parquet_metadata(f)
        out.append(tuple(meta.row_group(k).num_rows for k in range(meta.num_row_groups)))
    return tuple(out)


class ShardRows:
    """Raw cells and labels of split rows by index (shards in order, rows in file order)."""

    def __init__(
        self,
        files: tuple[str, ...],
        groups: tuple[tuple[int, ...], ...],
        shape: tuple[int, ...],
        kind: str,
        cache_rows: int = 0,
    ):
        self.files, self.shape, self.kind = files, tuple(shape), kind
        self.row_bytes = row_bytes(shape, kind)
        self.where = [(f, g) for f, rows in enumerate(groups) for g in range(len(rows))]
        sizes = [n for rows in groups for n in rows]
        self.start = np.cumsum([0, *sizes])  # the split row at which each group starts, then the total
        self.file_first = np.cumsum([0, *(sum(rows) for rows in groups)])
        self.capacity = cache_rows + 2 * max(sizes, default=0)

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw uint8 [len(rows), row_bytes] and labels int64 [len(rows)] of split rows `rows` (any order)."""
        rows = np.asarray(rows, dtype=np.int64)
        raw = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        labels = np.empty(len(rows), dtype=np.int64)
        for g, sel, local in self._by_group(rows):
            group_raw, group_labels = self._group(g, "image", self._read_cells)
            raw[sel], labels[sel] = group_raw[local], group_labels[local]
        return raw, labels

    def ids(self, rows: np.ndarray) -> np.ndarray:
        """The row ids of split rows `rows` as int64 [len(rows)], for sources whose ids are numbers (a sampling
        output's pairs: the sample ids, from which their noise is regenerated)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.int64)
        for g, sel, local in self._by_group(rows):
            out[sel] = self._group(g, "id", self._read_ids)[1][local]
        return out

    def _by_group(self, rows: np.ndarray):
        """(group, mask of `rows` in it, their rows within the group) for each row group `rows` [N] touch."""
        if len(rows) and (rows.min() < 0 or rows.max() >= self.start[-1]):
            raise IndexError(f"rows must be in [0, {int(self.start[-1])}); got [{rows.min()}, {rows.max()}]")
        group = np.searchsorted(self.start, rows, side="right") - 1
        for g in np.unique(group):
            sel = group == g
            yield int(g), sel, rows[sel] - self.start[g]

    def _group(self, g: int, what: str, read) -> tuple:
        """Group g's `what` columns, `read(g)` once and then kept in this process (LRU; each entry's second
        element is a per-row array, which the capacity counts)."""
        f, k = self.where[g]
        path = self.files[f]
        key = (path, storage.file_stamp(path), k, what)  # a local shard rewritten in place is read again
        if key in _GROUPS:
            _GROUPS.move_to_end(key)
            return _GROUPS[key]
        value = read(g)
        _GROUPS[key] = value
        while len(_GROUPS) > 1 and sum(len(v[1]) for v in _GROUPS.values()) > self.capacity:
            _GROUPS.popitem(last=False)
        return value

    def _read_cells(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Group g's raw cells [rows, row_bytes] and labels [rows]."""
        f, k = self.where[g]
        table = storage.parquet_file(self.files[f]).read_row_group(k, columns=["image", "label"])
        return (
            self._raw(table.column("image").combine_chunks(), f, int(self.start[g] - self.file_first[f])),
            table.column("label").to_numpy(zero_copy_only=False).astype(np.int64),
        )

    def _read_ids(self, g: int) -> tuple[None, np.ndarray]:
        """Group g's ids as int64 [rows]."""
        f, k = self.where[g]
        table = storage.parquet_file(self.files[f]).read_row_group(k, columns=["id"])
        return None, np.asarray(table.column("id").to_pylist(), dtype=np.int64)

    def _raw(self, cells, f: int, first: int) -> np.ndarray:
        """A group's binary cells as uint8 [rows, row_bytes], every row's size checked (`first`: the group's first
        row in its file, for the message)."""
        want, n = self.row_bytes, len(cells)
        offsets = np.frombuffer(cells.buffers()[1], dtype=np.int32)[cells.offset : cells.offset + n + 1]
        sizes = np.diff(offsets)
        valid = np.ones(n, bool) if cells.null_count == 0 else ~np.asarray(cells.is_null())
        bad = np.flatnonzero(~valid | (sizes != want))
        if len(bad):
            k = int(bad[0])
            got = "no bytes" if not valid[k] else f"{sizes[k]} bytes"
            raise ValueError(
                f"{self.files[f]}: row {first + k} has {got}; a row of shape {list(self.shape)} "
                f"({self.kind}) has {want}; re-ingest the data"
            )
        data = np.frombuffer(cells.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        return data.reshape(n, want)
