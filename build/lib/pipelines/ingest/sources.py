"""Ingest sources: parse a SPEC, check on the driver what can be checked there, and list the work as parts.

SPEC: digits | fashion-mnist[:DIR] | idx:DIR | folder:DIR | parquet:GLOB | npz:FILE | toy2d:NAME | imagenet:DIR |
tar:GLOB | manifold:NAME | snapshots:NAME | samples:DIR (a sampling output as reflow's (x_0, x_1) pairs).

A `Part` is a small JSON-able description of some rows (a row range of an array file, a list of image files, some
parquet row groups, one tar archive) that a Ray task reads alone with `read_part`, in bounded memory. The listing
is a function of the source alone, never of the parallelism, so the same source gives the same parts, rows and
ids on 1 or 100 CPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipelines.ingest.arrays import list_idx, list_imagenet, list_npz, read_idx, read_imagenet, read_npz
from pipelines.ingest.files import list_folder, list_parquet, list_tar, read_files, read_parquet, read_tar
from pipelines.ingest.generated import (
    list_digits,
    list_manifold,
    list_snapshots,
    list_toy,
    read_digits,
    read_manifold,
    read_snapshots,
    read_toy,
)
from pipelines.ingest.pairs import list_samples, read_samples
from pipelines.ingest.parts import IngestError, Listing, ListRequest, Part, Record


@dataclass(frozen=True)
class Source:
    """One kind of source: how the driver lists it (checks what it can and cuts the rows into parts) and how a Ray
    task reads one part, in bounded memory and a fixed order."""

    list: Callable[[ListRequest], Listing]
    read: Callable[..., Iterator[Record]]
    argument: str | None  # what follows "KIND:" (DIR, GLOB, FILE, NAME); None: no argument
    optional: bool = False  # the argument may be left out (fashion-mnist: Debian's folder)

    def usage(self, kind: str) -> str:
        if self.argument is None:
            return kind
        return f"{kind}[:{self.argument}]" if self.optional else f"{kind}:{self.argument}"


def parse_source(spec: str) -> tuple[str, str | None]:
    """SPEC -> (kind, argument); raises IngestError naming what is allowed."""
    kind, _, arg = spec.partition(":")
    if kind not in SOURCES:
        raise IngestError(f"unknown source {spec!r}; allowed: {', '.join(s.usage(k) for k, s in SOURCES.items())}")
    source = SOURCES[kind]
    if source.argument is not None and not source.optional and not arg:
        raise IngestError(f"source {kind!r} needs an argument: {source.usage(kind)}")
    return kind, arg or None


def list_source(spec: str, min_parts: int = 4, max_rows_per_part: int = 20_000) -> Listing:
    """Check a source from the driver and split it into parts of at most `max_rows_per_part` rows (and at least
    `min_parts` parts where it has the rows). Raises IngestError for a source that cannot be read at all."""
    kind, arg = parse_source(spec)
    listing = SOURCES[kind].list(ListRequest(spec, kind, arg, min_parts, max_rows_per_part))
    if listing.rows == 0:
        raise IngestError(f"source {spec!r} holds no rows")
    # number the parts in listing order: file names and manifest order follow it
    listing.parts = [Part(i, p.source, p.args, p.rows) for i, p in enumerate(listing.parts)]
    return listing


def read_part(part: Part) -> Iterator[Record]:
    """The records of one part, in a fixed order (runs in a Ray task)."""
    return SOURCES[part.source].read(**part.args)


SOURCES: dict[str, Source] = {
    "digits": Source(list_digits, read_digits, None),
    "fashion-mnist": Source(list_idx, read_idx, "DIR", optional=True),
    "idx": Source(list_idx, read_idx, "DIR"),
    "folder": Source(list_folder, read_files, "DIR"),
    "parquet": Source(list_parquet, read_parquet, "GLOB"),
    "npz": Source(list_npz, read_npz, "FILE"),
    "toy2d": Source(list_toy, read_toy, "NAME"),
    "imagenet": Source(list_imagenet, read_imagenet, "DIR"),
    "tar": Source(list_tar, read_tar, "GLOB"),
    "manifold": Source(list_manifold, read_manifold, "NAME"),
    "snapshots": Source(list_snapshots, read_snapshots, "NAME"),
    "samples": Source(list_samples, read_samples, "DIR"),
}
