"""The training config against its data, before Ray starts: the split, the model and the method suit the rows that
`flowray ingest` wrote (`Manifest`), a batch fits one worker, and `train.init_from` holds the model this config
builds. Errors name the key, the bad value and what is allowed (`pipelines.core.settings`)."""

from __future__ import annotations

import numpy as np

from fm.methods import METHODS, make_method
from fm.seeding import SEEDING_VERSION
from pipelines.core.checkpoint import load_meta, load_model
from pipelines.core.errors import ConfigError
from pipelines.core.manifest import Manifest
from pipelines.core.memory import check_fits, model_item_bytes
from pipelines.core.settings import check
from pipelines.train.config import Config, method_kwargs, model_kwargs


def check_data(cfg: Config):
    """Validate the data section against the ingest manifest (before Ray starts); returns the `Manifest`."""
    try:
        manifest = Manifest.load(cfg.data.shards)
    except ConfigError as err:
        raise ConfigError(f"data.shards: {err}") from None
    check(
        cfg.data.split in manifest.splits,
        "data.split",
        cfg.data.split,
        f"splits in {cfg.data.shards}: {', '.join(manifest.splits)}",
    )
    if manifest.data.is_image:
        size = manifest.data.shape[0]
        levels = len(cfg.model.channel_mult)
        check(cfg.model.name == "unet", "model.name", cfg.model.name, "image data needs the unet")
        check(
            size % (2 ** (levels - 1)) == 0,
            "model.channel_mult",
            cfg.model.channel_mult,
            f"{levels} levels need the image size {size} divisible by {2 ** (levels - 1)}",
        )
    else:
        check(cfg.model.name == "mlp", "model.name", cfg.model.name, "point data needs the mlp")
    try:  # the method suits the data: Riemannian methods need a manifold, snapshot methods snapshots
        make_method(**method_kwargs(cfg, manifest.data))
    except ValueError as err:
        raise ConfigError(f"method.name: {err} ({cfg.data.shards} holds {manifest.data.source})") from None
    given, pairs = METHODS[cfg.method.name].coupling == "given", manifest.data.pairs is not None
    check(
        not given or pairs,
        "method.name",
        cfg.method.name,
        f"it trains on a sampling output's pairs (x_0, x_1 = ODE(x_0)), but {cfg.data.shards} holds "
        f"{manifest.data.source}; ingest pairs with `flowray ingest --source samples:DIR`, or run `flowray reflow`",
    )
    check(
        given or not pairs,
        "method.name",
        cfg.method.name,
        f"{cfg.data.shards} holds a sampling output's pairs (x_0, x_1 = ODE(x_0)), which {cfg.method.name} would "
        "re-pair with fresh noise; train on them with method.name=reflow",
    )
    seeding = (manifest.data.pairs or {}).get("seeding", 1)
    check(
        not pairs or seeding == SEEDING_VERSION,
        "data.shards",
        str(cfg.data.shards),
        f"its pairs were ingested from samples seeded by version {seeding} (the low 32 bits of each seed); this "
        f"version (seeding {SEEDING_VERSION}) would regenerate other x_0 for them; sample and ingest the pairs again",
    )
    check(
        not (pairs and cfg.data.hflip),
        "data.hflip",
        True,
        "a flipped x_1 is not the sample of its x_0: pairs need data.hflip=false",
    )
    if cfg.train.init_from:
        check_init_from(cfg, manifest.data)
    if cfg.model.class_conditional:
        check(
            manifest.raw.get("labelled", True) and manifest.data.num_classes > 0,
            "model.class_conditional",
            True,
            f"{cfg.data.shards} was ingested unlabelled (no classes to condition on)",
        )
    if cfg.train.val_rows:
        check(
            cfg.train.val_split in manifest.splits,
            "train.val_split",
            cfg.train.val_split,
            f"splits in {cfg.data.shards}: {', '.join(manifest.splits)}",
        )
    count = manifest.count(cfg.data.split)
    check(
        count >= cfg.train.batch_size * cfg.ray.num_workers,
        "train.batch_size",
        cfg.train.batch_size,
        f"the {cfg.data.split} split has {count} rows, fewer than batch_size x num_workers",
    )
    # a batch one Train worker could not hold: its activations, and the paired steps its reader keeps ready
    cells = 2 * 4 * int(np.prod(manifest.data.model_shape))  # x_0 and x_1 of one item, float32
    check_fits(
        "train.batch_size",
        cfg.train.batch_size,
        model_item_bytes(cfg.model.name, model_kwargs(cfg, manifest.data), training=True)
        + cfg.data.buffer_batches * cells,
        "one Train worker",
        hint=": activations estimated from the model's feature maps, and data.buffer_batches "
        f"({cfg.data.buffer_batches}) paired steps kept ready",
    )
    return manifest


def check_init_from(cfg: Config, data) -> None:
    """`train.init_from` names a readable checkpoint of the model this config builds on these rows."""
    try:
        meta = load_meta(cfg.train.init_from)
    except ConfigError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    if meta.model_name != cfg.model.name:
        raise ConfigError(
            f"train.init_from: {cfg.train.init_from} holds a {meta.model_name} model; this config "
            f"builds a {cfg.model.name}"
        )
    diff = [
        f"{k}={meta.model_kwargs.get(k)!r} (this config: {v!r})"
        for k, v in model_kwargs(cfg, data).items()
        if meta.model_kwargs.get(k) != v
    ]  # both JSON's types: model_kwargs gives lists, not tuples
    if diff:
        raise ConfigError(
            f"train.init_from: {cfg.train.init_from} was trained with another model shape: "
            f"{', '.join(diff)}; set the model.* keys to its values (or leave init_from empty)"
        )
    try:  # its meta.json against its weights, here rather than in the workers after their retries
        load_model(cfg.train.init_from)
    except ConfigError as err:
        raise ConfigError(f"train.init_from: {err}") from None
