"""Post-hoc EMA through the pipeline, on the session's trained run (`trained_digits`, which kept snapshots of the
profiles 0.05 and 0.10 every 2 steps): the snapshots agree with the checkpoints, `flowray ema` rebuilds EMA lengths
from them into checkpoints the batch jobs take, nested under the training run in MLflow, and bad input is named."""

import json
import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from fm.ema import sigma_rel_to_gamma
from pipelines.core.checkpoint import load_meta, load_model, load_state
from pipelines.core.errors import ConfigError


def _snapshot(run_dir, step: int) -> dict:
    return torch.load(f"{run_dir}/ema_snapshots/step_{step:08d}.pt", weights_only=True)


@pytest.mark.heavy  # reads the session's trained run (trained once per CI, in `make heavy`)
def test_flowray_ema_rebuilds_lengths_that_sample(trained_digits, tmp_path):
    from jobs.ema import main as ema_main
    from jobs.sample import main as sample_main

    res, uri = trained_digits["train"], trained_digits["uri"]
    run_dir = res["run_dir"]
    # a snapshot every 2 steps from rank 0, and the one at a checkpoint's step is that checkpoint's profiles
    # (the story may have continued the run past step 8; this test reads steps up to 8)
    steps = sorted(int(p.name[5:13]) for p in (trained_digits["tmp"] / "runs" / "tiny" / "ema_snapshots").iterdir())
    assert steps[:4] == [2, 4, 6, 8]
    at_8 = _snapshot(run_dir, 8)
    assert (at_8["step"], at_8["sigma_rels"]) == (8, [0.05, 0.1])
    saved = load_state(res["checkpoint"], "power_ema")
    assert saved["num_updates"] == 8
    for kept, snap in zip(saved["modules"], at_8["modules"], strict=True):
        assert all(torch.equal(kept[k], snap[k]) for k in kept)
    assert json.loads(at_8["meta"])["mlflow_run_id"] == res["run_id"]

    out = ema_main(
        [
            "--run",
            f"runs:/{res['run_id']}",
            "--sigma-rel",
            "0.05,0.08",
            "--step",
            "8",
            "--out",
            str(tmp_path / "ema"),
            "--tracking-uri",
            uri,
        ]
    )
    tracked, other = out["rebuilt"]
    assert (tracked["step"], tracked["snapshots"], tracked["sigma_rel"]) == (8, 4, 0.05)
    # a tracked length at a snapshot's step is that snapshot's profile
    assert tracked["fit_error"] < 1e-6
    rebuilt = load_state(tracked["checkpoint"], "ema")["module"]
    for k, v in at_8["modules"][0].items():
        torch.testing.assert_close(rebuilt[k], v, rtol=0, atol=1e-6)
    # another length is a mix of the snapshots, a checkpoint that loads as any other, with its lineage in meta.json
    assert other["gamma"] == pytest.approx(sigma_rel_to_gamma(0.08)) and other["fit_error"] < 0.1
    loaded = load_model(other["checkpoint"])
    assert loaded.step == 8 and loaded.meta.posthoc_ema["snapshot_steps"] == [2, 4, 6, 8]
    assert loaded.meta.method == load_meta(res["checkpoint"]).method
    # nested under the training run in MLflow
    client = MlflowClient(uri)
    child = client.get_run(other["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == res["run_id"] and child.data.tags["flowray.kind"] == "ema"
    assert child.data.params["sigma_rel"] == "0.08" and child.data.tags["flowray.checkpoint"] == other["checkpoint"]
    # the batch stage samples it as it samples any checkpoint
    sampled = sample_main(
        [
            "--checkpoint",
            other["checkpoint"],
            "--num-samples",
            "8",
            "--out",
            str(tmp_path / "samples"),
            "--no-mlflow",
            "--set",
            "sample.solver=euler",
            "--set",
            "sample.steps=4",
        ]
    )
    assert sampled["num_samples"] == 8

    # bad input, before any work
    from pipelines.train.posthoc_ema import rebuild

    for args, message in [
        ((run_dir, [0.3]), "--sigma-rel: 0.3 is not allowed; each must be in (0, 0.2887)"),
        ((run_dir, [0.05], 1), "--step: 1 is before the run's first snapshot (step 2); snapshots span steps 2 to "),
        (
            (str(tmp_path), [0.05]),
            f"--run: no post-hoc EMA snapshots in {tmp_path}/ema_snapshots; train the run "
            "with train.ema_snapshot_every > 0",
        ),
        ((str(tmp_path / "nowhere"), [0.05]), f"--run: {tmp_path / 'nowhere'} does not exist"),
    ]:
        with pytest.raises(ConfigError) as err:
            rebuild(*args)
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(SystemExit) as stop:
        ema_main(["--run", run_dir, "--sigma-rel", "0.05,x"])
    assert stop.value.code == 2
    # the run cannot continue with other profiles (they average it from its first step)
    from pipelines.train.config import load_config
    from pipelines.train.driver import run_training

    sets = [
        s if not s.startswith("mlflow.tracking_uri=") else f"mlflow.tracking_uri={uri}" for s in trained_digits["sets"]
    ]
    for change, now in (("optim.ema_sigma_rels=[0.05]", "[0.05]"), ("train.ema_snapshot_every=0", "None")):
        with pytest.raises(
            ConfigError,
            match=rf"its post-hoc EMA profiles \(optim.ema_sigma_rels with "
            rf"train.ema_snapshot_every > 0\) were \[0.05, 0.1\], now "
            rf"{re.escape(now)}: they average the run from its first step",
        ):
            run_training(load_config("configs/digits-cpu.yaml", [*sets, "train.steps=20", change]))
