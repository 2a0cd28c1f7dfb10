"""The Ray Data sampling stage: determinism across actors and batch sizes, resume after failure, bad input."""

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from pipeline_helpers import make_checkpoint

from pipelines.batch.config import SampleConfig
from pipelines.batch.sample import run_sampling
from pipelines.core.checkpoint import CheckpointError, load_model
from pipelines.core.errors import ConfigError
from pipelines.core.samples import SamplingError, read_samples

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _all(out):
    ids, images, _ = read_samples(out)
    order = np.argsort(ids)
    return ids[order], images[order]


def test_bit_identical_across_actors_and_batch_sizes_and_resume(tmp_path, ray_local):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    base = dict(num_samples=50, solver="euler", steps=4, block_size=8, seed=3)
    ref = run_sampling(str(ckpt), tmp_path / "a", SampleConfig(**base, actors=1, blocks_per_call=1))
    assert ref.blocks == 7 and ref.blocks_sampled == 7 and ref.mean_nfe == 4
    ids, images = _all(tmp_path / "a")
    assert ids.tolist() == list(range(50))
    two = run_sampling(str(ckpt), tmp_path / "b", SampleConfig(**base, actors=2, blocks_per_call=2))
    assert two.blocks_sampled == 7
    ids_b, images_b = _all(tmp_path / "b")
    assert ids_b.tolist() == ids.tolist() and all(x == y for x, y in zip(images, images_b, strict=True))

    # a run killed part-way (injected failure at block 3), then rerun: exactly N ids, bit-identical
    with pytest.raises(Exception, match="injected sampling failure at block 3"):
        run_sampling(str(ckpt), tmp_path / "c", SampleConfig(**base, fail_at_block=3))
    rerun = run_sampling(str(ckpt), tmp_path / "c", SampleConfig(**base, fail_at_block=3))
    assert rerun.blocks_reused + rerun.blocks_sampled == 7 and rerun.blocks_sampled >= 1
    ids_c, images_c = _all(tmp_path / "c")
    assert ids_c.tolist() == ids.tolist() and all(x == y for x, y in zip(images, images_c, strict=True))

    # a truncated shard and a leftover temporary file are detected and redone
    shard = tmp_path / "c" / "block-00000002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    (tmp_path / "c" / ".block-00000005.parquet.123.tmp").write_bytes(b"half")
    again = run_sampling(str(ckpt), tmp_path / "c", SampleConfig(**base))
    assert again.blocks_sampled == 1 and again.blocks_reused == 6
    ids_d, images_d = _all(tmp_path / "c")
    assert ids_d.tolist() == ids.tolist() and all(x == y for x, y in zip(images, images_d, strict=True))
    assert not list((tmp_path / "c").glob(".block-*"))

    # the output grows: 50 -> 75 keeps the 6 whole blocks, redoes the partial 7th, adds 3; as a fresh run at 75
    grown = run_sampling(str(ckpt), tmp_path / "c", SampleConfig(**{**base, "num_samples": 75}))
    assert (grown.blocks, grown.blocks_reused, grown.blocks_sampled) == (10, 6, 4)
    fresh = run_sampling(str(ckpt), tmp_path / "e", SampleConfig(**{**base, "num_samples": 75}, actors=2))
    ids_g, images_g = _all(tmp_path / "c")
    ids_f, images_f = _all(tmp_path / "e")
    assert ids_g.tolist() == ids_f.tolist() == list(range(75)) and fresh.blocks_sampled == 10
    assert all(x == y for x, y in zip(images_g, images_f, strict=True))
    assert all(x == y for x, y in zip(images[:48], images_g[:48], strict=True))  # the kept blocks, untouched
    with pytest.raises(SamplingError, match=r"holds 75 samples; --num-samples 60 would shrink it: ask for 75 or more"):
        run_sampling(str(ckpt), tmp_path / "c", SampleConfig(**{**base, "num_samples": 60}))
    with pytest.raises(SamplingError, match=r"holds samples made with other settings \{'seed': \(3, 4\)\}; use a new"):
        run_sampling(str(ckpt), tmp_path / "c", SampleConfig(**{**base, "num_samples": 80, "seed": 4}))
    assert _all(tmp_path / "c")[0].tolist() == list(range(75))  # a refused request changes nothing
    # an output sampled before the seeding used the whole seed (no version recorded) is not added to
    settings = tmp_path / "c" / "_sampling.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "seeding"}))
    with pytest.raises(
        SamplingError,
        match=r"holds samples whose noise was seeded by version 1 \(the low 32 bits of "
        r"each seed\); this version seeds by version 2 \(all 63 bits\) and does "
        r"not add its samples to them; use a new --out",
    ):
        run_sampling(str(ckpt), tmp_path / "c", SampleConfig(**{**base, "num_samples": 80}))


def test_sde_sampler_and_mlflow_lineage(tmp_path, ray_local):
    from pipelines.batch.sample import log_sampling_run, open_sampling_run
    from pipelines.core.tracking import find_or_create_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    train_run, _ = find_or_create_run(uri, "lineage", "train-run")
    ckpt = make_checkpoint(tmp_path / "ckpt", run_id=train_run)
    cfg = SampleConfig(num_samples=12, solver="sde", steps=5, block_size=4, sde_g=0.5)
    res = run_sampling(str(ckpt), tmp_path / "s", cfg)
    assert res.mean_nfe == 5 and res.train_run_id == train_run
    from dataclasses import asdict

    run_id = log_sampling_run(res, asdict(cfg), uri, open_sampling_run(uri, str(ckpt), asdict(cfg)))
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["flowray.train_run_id"] == train_run
    assert run.data.tags["mlflow.parentRunId"] == train_run
    assert run.data.params["sample.solver"] == "sde" and run.data.metrics["mean_nfe"] == 5
    assert run.data.tags["flowray.samples_dir"] == str((tmp_path / "s").resolve())
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id)] == ["samples.png"]


def test_the_sampling_job_logs_system_metrics_and_a_refused_one_leaves_no_run(tmp_path, ray_local, monkeypatch):
    """`flowray sample`'s run is opened before the stage, so MLflow's system metrics of the stage land in it (every
    second here); a request refused inside the stage (a block too large for memory) ends the job with status 2 and
    deletes the run it had opened."""
    from jobs.sample import main
    from pipelines.core.tracking import find_or_create_run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    train_run, _ = find_or_create_run(uri, "sysmetrics", "train-run")
    ckpt = make_checkpoint(tmp_path / "ckpt", run_id=train_run)
    result = main(
        [
            "--checkpoint",
            str(ckpt),
            "--num-samples",
            "64",
            "--out",
            str(tmp_path / "s"),
            "--tracking-uri",
            uri,
            "--set",
            "sample.solver=dopri5",
            "--set",
            "sample.block_size=16",
        ]
    )
    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == train_run
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    exp = run.info.experiment_id
    before = {r.info.run_id for r in client.search_runs([exp])}
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--num-samples",
                "64",
                "--out",
                str(tmp_path / "big"),
                "--tracking-uri",
                uri,
                "--set",
                "sample.block_size=100000000",
            ]
        )
    assert stop.value.code == 2
    assert {r.info.run_id for r in client.search_runs([exp])} == before


def test_sample_cli_errors(tmp_path, capsys):
    from jobs.sample import main

    ckpt = make_checkpoint(tmp_path / "ckpt")
    for args, message in [
        (["--num-samples", "0"], "sampling failed: sample.num_samples: 0 is not allowed; must be >= 1"),
        (["--num-samples", "5", "--set", "sample.solver=rk45"], "sampling failed: sample.solver: 'rk45' is not"),
        (["--num-samples", "5", "--set", "sample.stepz=3"], "sampling failed: unknown key sample.stepz; allowed in"),
        (["--num-samples", "5", "--set", "sample.steps=many"], "sample.steps: 'many' is not a valid int"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--no-mlflow", *args])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--num-samples", "5"])
    assert "checkpoint directory" in capsys.readouterr().err


def test_bad_sampling_input(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="sample.num_samples: 0 is not allowed; must be >= 1"):
        run_sampling(str(ckpt), tmp_path / "o", SampleConfig(num_samples=0))
    with pytest.raises(ConfigError, match="sample.solver: 'rk45' is not allowed; allowed: dopri5"):
        run_sampling(str(ckpt), tmp_path / "o", SampleConfig(solver="rk45"))
    with pytest.raises(CheckpointError, match="checkpoint directory .*nope does not exist"):
        run_sampling(str(tmp_path / "nope"), tmp_path / "o", SampleConfig())
    # a checkpoint whose weights belong to another architecture
    other = make_checkpoint(tmp_path / "other", model_channels=16)
    meta = (other / "meta.json").read_text().replace('"model_channels": 16', '"model_channels": 8')
    (other / "meta.json").write_text(meta)
    with pytest.raises(CheckpointError, match="weights do not fit model unet"):
        load_model(other)
    with pytest.raises(CheckpointError, match=r"trained with model.image_size=8, but 32 is required"):
        load_model(ckpt, expect={"image_size": 32})
    # a sample directory with a foreign schema
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "_sampling.json").write_text("{}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), foreign / "block-00000000.parquet")
    with pytest.raises(SamplingError, match="foreign schema \\['x'\\]"):
        read_samples(foreign)
    with pytest.raises(SamplingError, match="is not a sampling output"):
        read_samples(tmp_path)
    shutil.rmtree(foreign)
    # an output directory made with other settings is not mixed with new samples
    from pipelines.batch.sample import prepare_output

    prepare_output(tmp_path / "made", SampleConfig(num_samples=10), str(ckpt))
    with pytest.raises(SamplingError, match="holds samples made with other settings .*solver"):
        prepare_output(tmp_path / "made", SampleConfig(num_samples=20, solver="euler"), str(ckpt))
