"""Reflow on real Ray and MLflow: a sampling output becomes a pairs source whose noise is regenerated bit for bit, the
training stream keeps its pairs, bad pairs are refused in words, and `flowray reflow` runs its chain on digits."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from pipeline_helpers import TINY, make_checkpoint

from fm.data import to_model_space, to_uint8
from fm.ema import EMA
from fm.models import GaussianOTFlow
from fm.solvers import ode_sample
from jobs.reflow import main as reflow_main
from pipelines.batch.config import SampleConfig
from pipelines.batch.sample import run_sampling
from pipelines.core.checkpoint import save_checkpoint
from pipelines.core.errors import ConfigError
from pipelines.core.samples import sample_noise
from pipelines.ingest.parts import IngestError
from pipelines.ingest.run import ingest, load_manifest
from pipelines.train.against_data import check_data
from pipelines.train.config import load_config
from pipelines.train.stream import PairSteps, read_steps, stream_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _gaussian_checkpoint(directory):
    """The closed-form OT flow from N(0, I) to N(0.1, 0.4^2 I) on 4x4 grey images: every op elementwise, so a sample
    is a function of its own noise alone, whatever its block."""
    flow = GaussianOTFlow(mu=0.1, std=0.4)
    manifest = {"source": "npz:x", "kind": "image", "shape": [4, 4, 1], "num_classes": 1, "class_names": []}
    return str(
        save_checkpoint(
            directory,
            step=3,
            model=flow,
            ema_state=EMA(flow).state_dict(),
            optimizer=None,
            model_name="gaussian_ot",
            model_kwargs={"mu": 0.1, "std": 0.4},
            method_kwargs={"name": "fm_ot", "sigma_min": 0.0},
            config={},
            manifest=manifest,
        )
    )


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("pairs")
    ckpt = _gaussian_checkpoint(tmp / "ckpt")
    cfg = SampleConfig(num_samples=40, solver="euler", steps=4, block_size=16, seed=7, actors=2)
    out = run_sampling(ckpt, tmp / "samples", cfg).out
    result = ingest(f"samples:{out}", tmp / "data", shards=2, unlabelled=True)
    return {"tmp": tmp, "ckpt": ckpt, "samples": out, "data": tmp / "data", "manifest": result.manifest, "cfg": cfg}


def test_the_pairs_noise_is_regenerated_bit_for_bit(pairs):
    manifest = load_manifest(pairs["data"])
    assert manifest.data.pairs["seed"] == 7 and manifest.data.pairs["checkpoint"] == pairs["ckpt"]
    assert (manifest.data.pairs["solver"], manifest.data.pairs["steps"], manifest.data.pairs["num_samples"]) == (
        "euler",
        4,
        40,
    )
    assert manifest.data.pairs["method"] == "fm_ot" and manifest.raw["quarantined"] == 0
    assert manifest.count("train") + manifest.count("test") == 40
    rows = pa.concat_tables([pq.read_table(p) for s in ("train", "test") for p in manifest.shard_paths(s)])
    ids = np.asarray([int(i) for i in rows["id"].to_pylist()])
    # each row's x_0, regenerated from its id, solved again in this process, is the stored sample byte for byte
    x_0 = sample_noise(7, ids, [1, 4, 4])
    flow = GaussianOTFlow(mu=0.1, std=0.4)
    again = to_uint8(ode_sample(lambda x, t: flow(x, t), x_0, "euler", 4).x_1)
    stored = torch.from_numpy(np.frombuffer(b"".join(rows["image"].to_pylist()), np.uint8).reshape(-1, 1, 4, 4).copy())
    assert torch.equal(again, stored)
    assert not torch.equal(
        to_uint8(ode_sample(lambda x, t: flow(x, t), sample_noise(8, ids, [1, 4, 4]), "euler", 4).x_1), stored
    )  # another seed's noise is not


def test_the_training_stream_keeps_each_row_with_its_own_noise(pairs):
    cfg = load_config(
        None,
        [
            f"data.shards={pairs['data']}",
            "method.name=reflow",
            "model.name=unet",
            "model.channel_mult=[1]",
            "model.model_channels=8",
            "model.num_heads=1",
            "model.attention_resolutions=[]",
            "train.batch_size=8",
            "ray.num_workers=1",
        ],
    )
    manifest = check_data(cfg)
    spec = stream_spec(cfg, manifest, {"num_classes": None}, tasks=1)
    assert spec.pairs_seed == 7
    batch = read_steps({"id": np.arange(3)}, spec, rank=0, first_step=0)
    step = PairSteps(spec, 0)(batch)
    for k in range(3):
        ids = batch["sample_id"][k]
        assert torch.equal(torch.from_numpy(step["x_0"][k]), sample_noise(7, ids, [1, 4, 4]))
        x_1 = to_model_space(torch.from_numpy(batch["raw"][k]).view(-1, 4, 4, 1).permute(0, 3, 1, 2))
        assert torch.equal(torch.from_numpy(step["x_1"][k]), x_1)


def test_bad_pairs_are_refused_in_words(pairs, tmp_path, digits_copy, capsys):
    data, samples = pairs["data"], pairs["samples"]
    base = [
        f"data.shards={data}",
        "model.channel_mult=[1]",
        "model.model_channels=8",
        "model.num_heads=1",
        "model.attention_resolutions=[]",
        "train.batch_size=8",
        "ray.num_workers=1",
    ]
    with pytest.raises(
        ConfigError,
        match=r"method.name: 'otcfm' is not allowed; .* holds a sampling output's pairs "
        r"\(x_0, x_1 = ODE\(x_0\)\), which otcfm would re-pair with fresh noise; "
        r"train on them with method.name=reflow",
    ):
        check_data(load_config(None, [*base, "method.name=otcfm"]))
    with pytest.raises(
        ConfigError,
        match="data.hflip: True is not allowed; a flipped x_1 is not the sample of its "
        "x_0: pairs need data.hflip=false",
    ):
        check_data(load_config(None, [*base, "method.name=reflow", "data.hflip=true"]))
    with pytest.raises(
        ConfigError,
        match=r"train.init_from: .* was trained with another model shape: "
        r"image_size=8 \(this config: 4\)",
    ):
        check_data(
            load_config(
                None, [*base, "method.name=reflow", f"train.init_from={make_checkpoint(tmp_path / 'digits-model')}"]
            )
        )
    # an incomplete output, an SDE sampler's, a row whose seed is not its id's
    shutil.copytree(samples, tmp_path / "cut")
    blocks = sorted((tmp_path / "cut").glob("block-*.parquet"))
    blocks[-1].unlink()
    with pytest.raises(IngestError, match=r"holds 32 of its 40 samples; finish it first"):
        ingest(f"samples:{tmp_path / 'cut'}", tmp_path / "x", unlabelled=True)
    settings = json.loads((tmp_path / "cut" / "_sampling.json").read_text())
    (tmp_path / "cut" / "_sampling.json").write_text(json.dumps({**settings, "solver": "sde", "num_samples": 32}))
    with pytest.raises(
        IngestError, match="sampled with the SDE solver, whose samples are not a function of their noise"
    ):
        ingest(f"samples:{tmp_path / 'cut'}", tmp_path / "x", unlabelled=True)
    (tmp_path / "cut" / "_sampling.json").write_text(json.dumps({**settings, "num_samples": 32}))
    table = pq.read_table(blocks[0])
    seeds = table["seed"].to_pylist()
    seeds[3] += 1
    pq.write_table(table.set_column(1, "seed", pa.array(seeds, pa.int64())), blocks[0])
    made = ingest(f"samples:{tmp_path / 'cut'}", tmp_path / "x", unlabelled=True, max_bad_fraction=0.05).manifest
    assert made["quarantined"] == 1 and made["quarantine"][0]["id"] == "3"
    assert "sample 3 records seed" in made["quarantine"][0]["reason"]
    with pytest.raises(
        IngestError,
        match="--channels, --image-size and --transform would change x_1 and break each pair; leave them out",
    ):
        ingest(f"samples:{samples}", tmp_path / "y", unlabelled=True, image_size=8, transform="resize")
    with pytest.raises(
        ConfigError,
        match=r"method.name: 'reflow' is not allowed; it trains on a sampling output's "
        r"pairs .* ingest pairs with `flowray ingest --source samples:DIR`",
    ):
        check_data(
            load_config("configs/digits-cpu.yaml", [*TINY, f"data.shards={tmp_path / 'digits'}", "method.name=reflow"])
        )
    # pairs whose noise the evaluation samplers would draw again: the reflowed model scored on its training noise
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        reflow_main(
            [
                "--checkpoint",
                str(tmp_path / "digits-model"),
                "--data",
                str(digits_copy),
                "--num-pairs",
                "64",
                "--sample-set",
                "sample.seed=3",
                "--pair-seed",
                "3",
                "--out",
                str(tmp_path / "never"),
            ]
        )
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        "reflow failed: --pair-seed: 3 is not allowed; the evaluation samplers draw their noise from sample.seed=3 "
        "too, so the reflowed models would be scored on the x_0 of their own training pairs; give the pairs a seed "
        "of their own"
    )
    # a pairs source sampled before the seeding used the whole seed: its x_0 cannot be regenerated
    (tmp_path / "cut" / "_sampling.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "seeding"}))
    with pytest.raises(
        IngestError,
        match=r"its noise was seeded by version 1 \(the low 32 bits of each seed\), and "
        r"this version \(seeding 2\) would regenerate other x_0",
    ):
        ingest(f"samples:{tmp_path / 'cut'}", tmp_path / "z", unlabelled=True)
    assert not (tmp_path / "never").exists()
    # pairs ingested from such an output by an older version: refused before training
    shutil.copytree(data, tmp_path / "old-pairs")
    path = tmp_path / "old-pairs" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["pairs"]["seeding"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        ConfigError,
        match=r"data.shards: '.*old-pairs' is not allowed; its pairs were ingested from "
        r"samples seeded by version 1 \(the low 32 bits of each seed\)",
    ):
        check_data(load_config(None, [*base, "method.name=reflow", f"data.shards={tmp_path / 'old-pairs'}"]))


@pytest.mark.heavy
def test_flowray_reflow_runs_its_chain_on_digits(tmp_path, ray_local, scored_digits):
    digits = scored_digits  # with the classifier and the reference's statistics cached: the chain is what it protects
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gen = make_checkpoint(tmp_path / "generator")
    sets = [
        *TINY,
        f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={uri}",
        "mlflow.experiment=tests",
        "train.steps=4",
        "train.sample_every=0",
        "train.val_rows=16",
        "ray.num_workers=1",  # the chain is what this test protects; a second worker costs each of its fits 2-3 s
    ]
    result = reflow_main(
        [
            "--checkpoint",
            str(gen),
            "--data",
            str(digits),
            "--num-pairs",
            "64",
            "--config",
            "configs/digits-cpu.yaml",
            "--solvers",
            "euler:1",
            "--num-samples",
            "32",
            "--distill",
            "--out",
            str(tmp_path / "reflow"),
            "--name",
            "rf",
            "--eval-set",
            "eval.max_images=16",
            "--eval-set",
            "eval.straightness_samples=8",
            "--sample-set",
            "sample.block_size=16",
            *[a for s in sets for a in ("--set", s)],
        ]
    )
    client = MlflowClient(uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["flowray.kind"] == "reflow"
    metrics = parent.data.metrics
    assert {"fd_euler1_r0", "fd_euler1_r1", "straightness_r0", "straightness_r1", "pairs_wall_s_r1"} <= set(metrics)
    rnd, distilled = result["rounds"]
    trained = client.get_run(rnd["train"]["run_id"])
    assert trained.data.tags["mlflow.parentRunId"] == parent.info.run_id and trained.info.status == "FINISHED"
    assert trained.data.params["method.name"] == "reflow" and trained.data.params["train.init_from"] == str(gen)
    assert "val_loss" in trained.data.metrics
    pairs = load_manifest(rnd["data"]).data.pairs
    assert (pairs["checkpoint"], pairs["num_samples"], pairs["solver"]) == (str(gen), 64, "dopri5")
    # the table names every model and solver, and is the parent's artifact
    assert "| generating model |" in result["table"] and "| reflow 1 |" in result["table"]
    assert "reflow.md" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    # --distill: one more round distills reflow 1 into a one-step map, from its own pairs, sampled in one jump
    assert distilled["distilled"] and not rnd["distilled"]
    one_step = client.get_run(distilled["train"]["run_id"])
    assert one_step.data.params["method.name"] == "distill" and one_step.info.status == "FINISHED"
    assert one_step.data.params["train.init_from"] == rnd["train"]["checkpoint"]
    assert one_step.data.tags["flowray.reflow.round"] == "distill"
    assert load_manifest(distilled["data"]).data.pairs["checkpoint"] == rnd["train"]["checkpoint"]
    (jump,) = distilled["solves"]
    assert (jump["solver"], jump["sample"]["mean_nfe"]) == ("jump1", 1.0)
    assert jump["evaluation"]["likelihood"] is None and jump["evaluation"]["quality"]["fd"] > 0
    assert metrics["fd_jump1_r2"] == pytest.approx(jump["evaluation"]["quality"]["fd"])
    fd = f"{jump['evaluation']['quality']['fd']:.3f}"
    assert f"| distilled (1 jump) | {fd} | 1 |  |  |" in result["table"]
