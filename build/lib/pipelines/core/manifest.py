"""The manifest: the contract between ingest and every later stage, read once per job into typed objects.

`manifest.json` in an ingest output holds the row format (`DataSpec`: source, kind, shape, classes), the splits
with their shards (file, rows, sha256), and the quarantined rows. `DataSpec` is also what every checkpoint
records of the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipelines.core import storage
from pipelines.core.errors import ConfigError

MANIFEST = "manifest.json"
KINDS = ("image", "points")
SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()), ("image", pa.binary())])  # every data shard's
ROW_FORMAT_KEY = b"flowray.row_format"  # a shard's schema metadata: what its rows hold (`row_format`) and its split
FORMAT_KEYS = ("kind", "shape", "layout", "dtype")


def row_format(kind: str, shape: list[int]) -> dict:
    """What a data row holds: kind, shape, layout (HWC images, D points) and the cell's dtype."""
    return {
        "kind": kind,
        "shape": list(shape),
        "layout": "HWC" if kind == "image" else "D",
        "dtype": "uint8" if kind == "image" else "float32",
    }


def shard_schema(fmt: dict, split: str) -> pa.Schema:
    """The data shards' schema, carrying the row format and split in its metadata, so that a shard says what it
    holds and a manifest that disagrees with it is caught (`Manifest.check_shards`)."""
    return SCHEMA.with_metadata({ROW_FORMAT_KEY: json.dumps({**fmt, "split": split}).encode()})


class ManifestError(ConfigError):
    """A missing, malformed or inconsistent manifest; the message names the file and the key."""


@dataclass(frozen=True)
class DataSpec:
    """The rows' format: images are uint8 [H, W, C] cells, points float32 [D] cells (see `pipelines.core.cells`).

    Points may lie on a manifold (`manifold`, a `fm.manifolds.get_manifold` spec such as "sphere2": Riemannian
    methods only), or be snapshots of a dynamics observed at `times`, each row's label its snapshot index
    (snapshot methods only).
    """

    source: str
    kind: str
    shape: list[int]
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    manifold: str | None = None
    times: list[float] | None = None
    # a sampling output's (x_0, x_1) pairs (`samples:DIR`): row id i's x_0 is the standard normal draw of
    # derive_seed(pairs["seed"], i); also the generating checkpoint, method, solver and sample count
    pairs: dict | None = None

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    @property
    def model_shape(self) -> list[int]:
        """The model's input shape without the batch: [C, H, W] for images, [D] for points."""
        return [self.shape[2], self.shape[0], self.shape[1]] if self.is_image else list(self.shape)

    @property
    def name(self) -> str:
        """A short data set name for labels: "digits", "fashion-mnist", "checkerboard", ..."""
        kind, _, arg = self.source.partition(":")
        return arg if kind in ("toy2d", "manifold", "snapshots") else kind

    def to_dict(self) -> dict:
        d = {
            "source": self.source,
            "kind": self.kind,
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
        }
        if self.manifold is not None:
            d["manifold"] = self.manifold
        if self.times is not None:
            d["times"] = list(self.times)
        if self.pairs is not None:
            d["pairs"] = dict(self.pairs)
        return d

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "manifest") -> DataSpec:
        """Build and check; raise ManifestError naming `where` and the bad key."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a mapping with source, kind and shape; got {type(d).__name__}")
        for key in ("source", "kind", "shape"):
            if key not in d:
                raise ManifestError(f"{where}: key {key!r} is missing")
        shape = d["shape"]
        kind = d["kind"]
        if kind not in KINDS:
            raise ManifestError(f"{where}: kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
        want = 3 if kind == "image" else 1
        if not (
            isinstance(shape, list)
            and len(shape) == want
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        ):
            raise ManifestError(
                f"{where}: shape {shape!r} is not allowed; {kind} rows need a list of {want} "
                "positive integers" + (" [H, W, C]" if kind == "image" else " [D]")
            )
        num_classes = d.get("num_classes", 0)
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ManifestError(f"{where}: num_classes {num_classes!r} must be an integer >= 0")
        manifold, times = d.get("manifold"), d.get("times")
        if manifold is not None:
            from fm.manifolds import get_manifold

            try:
                m = get_manifold(str(manifold))
            except ValueError as err:
                raise ManifestError(f"{where}: manifold: {err}") from None
            if kind != "points" or shape != [m.ambient_dim]:
                raise ManifestError(
                    f"{where}: points on {m.label} need kind 'points' and shape [{m.ambient_dim}]; got {kind!r} {shape}"
                )
        if times is not None:
            if not (
                isinstance(times, list)
                and len(times) >= 2
                and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times)
                and all(b > a for a, b in zip(times[:-1], times[1:], strict=False))
            ):
                raise ManifestError(f"{where}: times {times!r} must be a list of at least two increasing numbers")
            if kind != "points" or num_classes != len(times):
                raise ManifestError(
                    f"{where}: snapshots at {len(times)} times need point rows labelled by "
                    f"snapshot index (num_classes {len(times)}); got {kind!r}, {num_classes}"
                )
        pairs = d.get("pairs")
        if pairs is not None and not (
            isinstance(pairs, dict) and isinstance(pairs.get("seed"), int) and isinstance(pairs.get("checkpoint"), str)
        ):
            raise ManifestError(
                f"{where}: pairs {pairs!r} must be a mapping with the sampling seed (an integer) and "
                "the generating checkpoint"
            )
        return cls(
            str(d["source"]),
            kind,
            list(shape),
            num_classes,
            list(d.get("class_names") or []),
            None if manifold is None else str(manifold),
            None if times is None else [float(t) for t in times],
            pairs,
        )


@dataclass(frozen=True)
class Manifest:
    """An ingest output's manifest: the data spec, the splits and their shards, the rest as read. `directory` is a
    location of `pipelines.core.storage`: a local folder (absolute) or an object-store prefix (`s3://bucket/data`)."""

    directory: str
    data: DataSpec
    splits: dict[str, dict]
    raw: dict

    @classmethod
    def load(cls, directory: str | Path, verify: bool = False, key: str = "") -> Manifest:
        """Read and check manifest.json; with verify, also every shard's sha256."""
        directory = storage.check_location(str(directory), key)
        if not storage.is_uri(directory):
            directory = str(Path(directory).resolve())
        path = storage.join(directory, MANIFEST)
        if not storage.is_file(path, key):
            raise ManifestError(f"{path} not found: run `python -m jobs.ingest --source ... --out {directory}` first")
        try:
            raw = json.loads(storage.read_text(path, key))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"{path}: expected a JSON object; got {type(raw).__name__}")
        data = DataSpec.from_dict(raw, str(path))
        splits = raw.get("splits")
        if not isinstance(splits, dict) or not splits:
            raise ManifestError(f"{path}: key 'splits' must map split names to their shards")
        for name, split in splits.items():
            if not (
                isinstance(split, dict)
                and isinstance(split.get("count"), int)
                and isinstance(split.get("shards"), list)
            ):
                raise ManifestError(f"{path}: splits.{name} needs an integer 'count' and a list 'shards'")
        manifest = cls(directory, data, splits, raw)
        manifest.check_shards()
        if verify:
            manifest.verify()
        return manifest

    def digest(self, split: str) -> str:
        """A content digest of one split (16 hex digits): sha256 over the row format and the split's shard checksums,
        so a re-ingest of the same rows gives the same digest wherever it is written."""
        shards = sorted(str(s.get("sha256")) for s in self.splits[split]["shards"])
        text = json.dumps(
            {"format": row_format(self.data.kind, self.data.shape), "split": split, "shards": shards}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def dataset(self, split: str) -> dict:
        """How MLflow names one split as a run's input: {name, digest, location, profile} for `dataset_input`."""
        return {
            "name": f"{self.data.name}/{split}",
            "digest": self.digest(split),
            "location": self.directory,
            "profile": {
                "split": split,
                "num_rows": self.count(split),
                "shape": list(self.data.shape),
                "num_classes": self.data.num_classes,
                "source": self.data.source,
            },
        }

    def path(self, *parts: str) -> str:
        """A location inside the ingest output (a shard, a cache beside the shards)."""
        return storage.join(self.directory, *parts)

    def check_split(self, split: str, key: str = "split") -> None:
        if split not in self.splits:
            raise ManifestError(
                f"{key}: {split!r} is not a split of {self.directory}; splits: {', '.join(self.splits)}"
            )

    def count(self, split: str) -> int:
        self.check_split(split)
        return int(self.splits[split]["count"])

    def shard_paths(self, split: str) -> list[str]:
        """Locations of a split's shards: absolute local paths, or URIs under an object-store prefix."""
        self.check_split(split)
        return [self.path(s["file"]) for s in self.splits[split]["shards"]]

    def shard_rows(self, split: str) -> list[int]:
        """Rows of each of a split's shards, in the order of `shard_paths`."""
        self.check_split(split)
        return [int(s["rows"]) for s in self.splits[split]["shards"]]

    def check_shards(self) -> None:
        """The cheap check, before any Ray work: every shard exists, has a readable parquet footer, the row count
        the manifest says, and records the manifest's row format (kind, shape, layout, dtype) and its split (a
        truncated or foreign file, or a manifest edited by hand, fails here, named)."""
        for name, split in self.splits.items():
            for shard in split["shards"]:
                path = self.path(str(shard.get("file")))
                if not storage.is_file(path):
                    raise ManifestError(f"{path}: shard of split {name!r} listed in {MANIFEST} is missing")
                meta = storage.parquet_footer(
                    path,
                    lambda why, path=path: ManifestError(
                        f"{path}: not a readable parquet file (truncated or corrupt: {why}); re-ingest, or check "
                        "with --verify"
                    ),
                )
                rows = meta.num_rows
                if rows != shard.get("rows"):
                    raise ManifestError(f"{path}: {rows} rows, but {MANIFEST} says {shard.get('rows')}")
                self._check_row_format(path, name, meta.schema.to_arrow_schema().metadata or {})

    def _check_row_format(self, path: str, split: str, metadata: dict) -> None:
        """The row format and split a shard records against the manifest's: any disagreement is refused, named."""
        if ROW_FORMAT_KEY not in metadata:
            raise ManifestError(
                f"{path}: the shard records no row format (schema metadata "
                f"{ROW_FORMAT_KEY.decode()!r}): not written by this version's ingest; re-ingest"
            )
        recorded = json.loads(metadata[ROW_FORMAT_KEY])
        want = {**{k: self.raw.get(k) for k in FORMAT_KEYS}, "split": split}
        want.update({k: v for k, v in row_format(self.data.kind, self.data.shape).items() if want[k] is None})
        for key, value in want.items():
            if recorded.get(key) != value:
                raise ManifestError(
                    f"{path}: the shard holds {key} {recorded.get(key)!r}, but {MANIFEST} says "
                    f"{value!r}; the manifest does not describe its shards: re-ingest"
                )

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest."""
        for split in self.splits.values():
            for shard in split["shards"]:
                got = sha256(self.path(shard["file"]))
                if got != shard["sha256"]:
                    raise ManifestError(
                        f"{self.path(shard['file'])}: checksum {got[:12]}... does not match "
                        f"the manifest's {shard['sha256'][:12]}..."
                    )


def sha256(location: str | Path) -> str:
    """The sha256 of a local file or an object, streamed in 1 MiB reads."""
    fs, path = storage.resolve(str(location))
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
