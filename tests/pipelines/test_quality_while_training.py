"""Sample quality while training (`train.eval_every`): each scored checkpoint's FD and bits/dim in the training run at
its step, the last equal to what `flowray sample` + `flowray evaluate` give on the same checkpoint and settings."""

import pytest
from mlflow.tracking import MlflowClient
from pipeline_helpers import TINY

from jobs.train import main as train_main
from pipelines.batch.evaluate import run_evaluation
from pipelines.batch.sample import run_sampling
from pipelines.chain import quality_configs
from pipelines.core.errors import ConfigError
from pipelines.core.manifest import Manifest
from pipelines.ingest.run import ingest
from pipelines.train.config import load_config


@pytest.mark.parametrize("sets, message", [
    (["train.checkpoint_every=4", "train.eval_every=6"],
     r"train.eval_every: 6 is not allowed; must be 0 \(off\) or a multiple of train.checkpoint_every=4"),
    (["train.eval_every=200", "train.eval_solver=sde"], r"train.eval_solver: 'sde' is not allowed; allowed: dopri5"),
    (["train.eval_every=200", "train.eval_samples=1"], r"train.eval_samples: 1 is not allowed; must be >= 2"),
])
def test_bad_quality_settings_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits-cpu.yaml", sets)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_quality_is_logged_at_each_scored_step_and_agrees_with_the_batch_jobs(tmp_path, ray_local):
    digits = tmp_path / "digits"
    ingest("digits", digits, shards=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [*TINY, f"data.shards={digits}", f"train.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={uri}",
            "train.run_name=quality", "mlflow.experiment=tests", "train.steps=8", "train.checkpoint_every=4",
            "train.eval_every=4", "train.eval_samples=32", "train.eval_rows=16", "train.sample_every=0"]
    result = train_main(["--config", "configs/digits-cpu.yaml", *[a for s in sets for a in ("--set", s)]])
    client = MlflowClient(uri)
    history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(result["run_id"], key),
                                                        key=lambda m: m.step)]
               for key in ("eval/fd", "eval/fd_floor", "eval/bpd", "eval/sample_nfe")}
    assert [s for s, _ in history["eval/fd"]] == [4, 8] and [s for s, _ in history["eval/bpd"]] == [4, 8]
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    # the same checkpoint through the batch jobs' functions, with the settings `train.eval_*` stand for
    scfg, ecfg = quality_configs(load_config("configs/digits-cpu.yaml", sets))
    samples = run_sampling(result["checkpoint"], tmp_path / "samples", scfg)
    ev = run_evaluation(result["checkpoint"], Manifest.load(str(digits)), samples.out, ecfg)
    assert history["eval/fd"][-1][1] == pytest.approx(ev.quality.fd, rel=1e-4)
    assert history["eval/fd_floor"][-1][1] == pytest.approx(ev.quality.fd_floor, rel=1e-4)
    assert history["eval/bpd"][-1][1] == pytest.approx(ev.likelihood.mean, rel=1e-4)
    assert history["eval/sample_nfe"][-1][1] == samples.mean_nfe

