"""A sampling output as (x_0, x_1) pairs for Rectified Flow's reflow (`samples:DIR`): the samples of a finished
`flowray sample` of an ODE, whose x_0 are regenerated from each row's seed."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fm.methods import METHODS
from fm.seeding import SEEDING_VERSION, derive_seed
from pipelines.core import storage
from pipelines.core.checkpoint import load_meta
from pipelines.core.errors import ConfigError
from pipelines.core.samples import sample_shards, sampling_settings
from pipelines.ingest.parts import IngestError, Listing, ListRequest, Part, Record

PAIR_SETTINGS = ("checkpoint", "solver", "steps", "atol", "rtol", "cfg_scale", "label", "seed", "num_samples")


def list_samples(req: ListRequest) -> Listing:
    """A sampling output (`flowray sample --out DIR`): row i is sample i, x_1 its image, its label the class it was
    sampled for; its x_0 is not stored but regenerated from derive_seed(seed, i), as the sampler drew it. Refused:
    an output without its settings, an incomplete one, a stochastic (SDE) sampler, a generating checkpoint that
    cannot be read or whose method does not start from standard normal noise."""
    files, total, _ = sample_shards(req.argument)
    settings = sampling_settings(req.argument)
    missing = [k for k in PAIR_SETTINGS if k not in settings]
    if missing:
        raise IngestError(
            f"{req.spec}: its _sampling.json lacks {', '.join(missing)}: the pairs cannot be "
            "regenerated; sample again with this version's `flowray sample`"
        )
    if settings.get("seeding", 1) != SEEDING_VERSION:
        raise IngestError(
            f"{req.spec}: its noise was seeded by version {settings.get('seeding', 1)} (the low 32 bits "
            f"of each seed), and this version (seeding {SEEDING_VERSION}) would regenerate other x_0 for "
            "its samples: the pairs would be wrong; sample again with this version's `flowray sample`"
        )
    if settings["solver"] == "sde":
        raise IngestError(
            f"{req.spec}: sampled with the SDE solver, whose samples are not a function of their noise; "
            "reflow needs an ODE's pairs (sample with dopri5, or a fixed-step ODE solver)"
        )
    if total != settings["num_samples"]:
        raise IngestError(
            f"{req.spec}: holds {total} of its {settings['num_samples']} samples; finish it first "
            f"(run `flowray sample` again with the same --out)"
        )
    try:
        meta = load_meta(settings["checkpoint"])
    except ConfigError as err:
        raise IngestError(f"{req.spec}: its generating checkpoint cannot be read ({err})") from None
    method, data = meta.method, meta.manifest or {}
    if METHODS.get(method["name"]) is None or METHODS[method["name"]].kind != "euclidean":
        raise IngestError(
            f"{req.spec}: sampled from a {method['name']!r} model, which does not start from standard "
            "normal noise; pairs need a Euclidean method"
        )
    shape, kind = list(data["shape"]), data["kind"]
    parts = [
        Part(
            0,
            "samples",
            {"file": f, "shape": shape, "kind": kind, "seed": int(settings["seed"])},
            storage.parquet_metadata(f).num_rows,
        )
        for f in files
    ]
    pairs = {
        **{k: settings[k] for k in PAIR_SETTINGS},
        "samples": req.arg,
        "method": method["name"],
        "model": {"name": meta.model_name, "kwargs": meta.model_kwargs},
        "step": meta.step,
        "seeding": SEEDING_VERSION,
    }
    # a class-conditional model's samples carry the class they were drawn for; an unconditional model's carry none
    labelled = bool(meta.model_kwargs.get("num_classes"))
    return Listing(
        req.spec,
        req.kind,
        parts,
        list(data.get("class_names") or []) if labelled else [],
        num_classes=data.get("num_classes") if labelled else None,
        element_shape=tuple(shape),
        points=kind == "points",
        labelled=labelled,
        pairs=pairs,
    )


def read_samples(file: str, shape: list[int], kind: str, seed: int) -> Iterator[Record]:
    """One sample shard's rows; a row whose recorded seed is not derive_seed(seed, id) is refused (not this output's
    noise, so its pair could not be regenerated)."""
    table = storage.read_table(file, ["id", "seed", "label", "image"])
    dtype = np.float32 if kind == "points" else np.uint8
    for i, s, label, cell in zip(*(table[c].to_pylist() for c in ("id", "seed", "label", "image")), strict=True):
        want = derive_seed(seed, i)
        if s != want:
            yield Record(
                str(i),
                max(label, 0),
                error=f"sample {i} records seed {s}, but this output's noise for "
                f"it is derive_seed({seed}, {i}) = {want}",
            )
            continue
        yield Record(str(i), max(label, 0), array=np.frombuffer(cell, dtype=dtype).reshape(shape))
