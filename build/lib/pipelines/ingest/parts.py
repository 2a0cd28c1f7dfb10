"""What a source's lister and reader exchange (`pipelines.ingest.sources`): the error, a record (one row before
validation), a part (rows one Ray task reads alone), a listing (a source's parts and what the driver learnt), and
the cutting of n rows into parts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from pipelines.core.errors import ConfigError


class IngestError(ConfigError):
    """Bad source or too many unusable rows."""


@dataclass
class Record:
    """One source row before validation: a decoded array, or raw encoded bytes, or an error already found."""

    id: str
    label: int
    array: np.ndarray | None = None
    encoded: bytes | None = None
    error: str | None = None
    split: str | None = None  # a split fixed by the source (fashion-mnist's and ImageNet's train/test files)


@dataclass(frozen=True)
class Part:
    """Rows one task reads: `source` names the entry of `SOURCES` whose reader reads it, `args` are the reader's
    JSON-able arguments."""

    index: int
    source: str
    args: dict
    rows: int  # rows listed (images, before validation)


@dataclass
class Listing:
    """A source's parts and what the driver learnt about it without reading the rows."""

    spec: str
    kind: str
    parts: list[Part]
    class_names: list[str] = field(default_factory=list)
    num_classes: int | None = None  # when known without the rows (ImageNet: 1000)
    element_shape: tuple[int, ...] | None = None  # of array sources: [H, W] or [H, W, C] or [D] for points
    encoded: bool = False  # rows are encoded image files, decoded by PIL
    points: bool = False
    labelled: bool = True  # False: the source has no labels (every row gets label 0)
    manifold: str | None = None  # points on this manifold (`fm.manifolds.get_manifold`); rows off it are quarantined
    times: list[float] | None = None  # snapshots: observation times, a row's label its snapshot index
    pairs: dict | None = None  # a sampling output: what made the pairs (`DataSpec.pairs`)
    ignored: list[dict] = field(default_factory=list)  # entries that are not rows: {"id", "reason"} (folders)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)


@dataclass(frozen=True)
class ListRequest:
    """What a lister is asked: the SPEC, its kind and argument, and how to cut it into parts."""

    spec: str
    kind: str
    arg: str | None
    min_parts: int  # at least this many parts where the source has the rows
    max_rows: int  # at most this many rows per part

    @property
    def argument(self) -> str:
        """The argument of a source that needs one (`parse_source` has checked that it is given)."""
        if self.arg is None:
            raise IngestError(f"source {self.kind!r} needs an argument")
        return self.arg


def stable_hash(text: str) -> float:
    """A uniform number in [0, 1) from a string, the same on every machine and Python process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def row_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering n rows in `parts` near-equal pieces (none empty)."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def part_count(total: int, min_parts: int, max_rows: int) -> int:
    return max(min_parts, -(-total // max_rows))
