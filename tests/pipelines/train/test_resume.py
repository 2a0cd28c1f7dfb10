"""What a run may change when it resumes (`pipelines.train.resume`), checked against a checkpoint's meta.json."""

import json

import pytest

from pipelines.core.checkpoint import CheckpointMeta
from pipelines.core.errors import ConfigError
from pipelines.core.manifest import DataSpec
from pipelines.train.config import load_config
from pipelines.train.resume import check_resumable, differences

DATA = DataSpec("digits", "image", [8, 8, 1], 10, [str(i) for i in range(10)])


def _raw(*sets: str) -> dict:
    """meta.json as training writes it (JSON round trip: tuples become lists) for the digits config + `sets`."""
    cfg = load_config("configs/digits-cpu.yaml", list(sets))
    return json.loads(
        json.dumps(
            {
                "step": 40,
                "model": {"name": cfg.model.name, "kwargs": {}},
                "method": {"name": cfg.method.name},
                "config": cfg.to_dict(),
                "manifest": DATA.to_dict(),
                "seeding": 2,
            }
        )
    )


def _meta(*sets: str) -> CheckpointMeta:
    return CheckpointMeta.from_dict(_raw(*sets), "meta.json")


def test_what_may_change_on_resume_is_accepted():
    now = load_config(
        "configs/digits-cpu.yaml",
        [
            "train.steps=9000",
            "optim.lr=0.01",
            "optim.schedule=cosine",
            "optim.ema_decay=0.99",
            "train.log_every=7",
            "train.checkpoint_every=11",
            "ray.num_workers=1",
            "ray.max_failures=0",
            "mlflow.experiment=other",
            "train.precision=bf16",
            "model.hidden=17",
            "model.depth=9",
        ],
    )  # an MLP's keys do not bind a UNet run
    assert differences(now, DATA, _meta()) == []


def test_what_must_stay_is_named_with_both_values():
    now = load_config(
        "configs/digits-cpu.yaml",
        ["train.seed=3", "train.batch_size=32", "method.name=otcfm", "model.channel_mult=[1, 1]"],
    )
    diffs = differences(now, DATA, _meta())
    assert diffs == [
        "model.channel_mult was [1, 2], now [1, 1]",
        "method.name was 'fm_ot', now 'otcfm'",
        "train.seed was 0, now 3",
        "train.batch_size was 64, now 32",
    ]
    other = DataSpec("digits", "image", [16, 16, 1], 10, [str(i) for i in range(10)])
    assert differences(load_config("configs/digits-cpu.yaml"), other, _meta()) == [
        "the data's shape was [8, 8, 1], now [16, 16, 1]"
    ]
    with pytest.raises(
        ConfigError,
        match=r"train.run_name='digits-cpu' already has a checkpoint at step 40 in "
        r"runs/digits-cpu, trained with another config, and cannot resume with "
        r"this one: train.seed was 0, now 3\. Set train.run_name to a new name to "
        r"start a new run, or remove runs/digits-cpu to train this name again",
    ):
        check_resumable(load_config("configs/digits-cpu.yaml", ["train.seed=3"]), DATA, _meta(), "runs/digits-cpu")


def test_keys_an_older_checkpoint_does_not_record_are_not_compared():
    meta = _meta()
    del meta.config["model"]["label_dropout"], meta.config["train"]["batch_size"]
    now = load_config("configs/digits-cpu.yaml", ["model.label_dropout=0.5", "train.batch_size=8"])
    assert differences(now, DATA, meta) == []


def test_a_run_seeded_the_old_way_is_not_continued_with_the_new_seeding():
    raw = _raw()
    del raw["seeding"]  # written before the seeding was recorded: version 1, the low 32 bits of each seed
    meta = CheckpointMeta.from_dict(raw, "meta.json")
    assert differences(load_config("configs/digits-cpu.yaml"), DATA, meta) == [
        "its noise, pairing and dropout streams were seeded by version 1 (the low 32 bits of each seed), this version "
        "seeds by version 2 (all 63 bits), and one run does not mix the two"
    ]
