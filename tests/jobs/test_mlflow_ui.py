"""MLflow's own UI, rendered by a real browser (Debian's headless Chromium) from a real `mlflow server` over the store
a tiny training run and its sampling run wrote: what a user opening the link a job prints sees."""

import re
import shutil
import subprocess
import tempfile

import pytest
from mlflow.tracking import MlflowClient
from pipeline_helpers import free_port, kill_tree, start_mlflow_server, tiny_config

from jobs.sample import main as sample_main
from pipelines.core.tracking import ui_link
from pipelines.ingest.run import ingest, load_manifest
from pipelines.train.driver import run_training

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(600),
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")]


def _page(url: str) -> tuple[str, str]:
    """The DOM after the page's scripts ran (25 s of virtual time), and its visible text in one line, in a fresh
    browser profile (the UI keeps choices such as its view in the browser's storage)."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                              "--virtual-time-budget=25000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", out.stdout))
    return out.stdout, text


def test_the_run_page_shows_dataset_source_child_runs_and_charts(tmp_path, ray_local):
    digits = tmp_path / "digits"
    ingest("digits", digits, shards=2)
    uri = f"sqlite:///{tmp_path / 'server.db'}"  # the store the server below serves (start_mlflow_server's name)
    trained = run_training(tiny_config(digits, tmp_path / "runs", uri, "ui-check", "train.steps=8",
                                       "train.val_rows=40"))
    sampled = sample_main(["--checkpoint", trained["checkpoint"], "--num-samples", "8", "--out",
                           str(tmp_path / "samples"), "--tracking-uri", uri, "--set", "sample.block_size=8"])
    run = MlflowClient(uri).get_run(trained["run_id"])
    server = start_mlflow_server(port := free_port(), tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        link = ui_link(base, trained["run_id"])
        assert link.endswith(f"/runs/{trained['run_id']}?workflowType=machine_learning")
        _, text = _page(link)
        digest = load_manifest(digits).digest("train")[:8]
        assert "Datasets digits/train" in text and digest in text  # the MLflow dataset input, by digest
        assert f"Source {run.data.tags['mlflow.source.name']}" in text
        assert "Child runs sample-dopri5" in text  # the sampling run, nested under the training run
        assert "Description fm_ot on digits/train, 8 steps of 16 x 2 workers" in text
        assert f"Created by {run.data.tags['mlflow.user']}" in text and "Status Finished" in text
        assert sampled["mlflow_run_id"] in {r.info.run_id for r in MlflowClient(uri).search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{trained['run_id']}'")}

        # the metric charts render (Plotly's figures) in the model-training view the link selects; a fresh browser
        # without it is in the GenAI view, which draws none
        dom, text = _page(link.replace("?", "/model-metrics?"))
        assert dom.count('class="main-svg"') >= 2 and "Model metrics" in text
        dom, _ = _page(link.split("?")[0] + "/model-metrics")
        assert dom.count('class="main-svg"') == 0

        # the experiment opens on its runs table in the model-training view when the link says so; without it, a
        # fresh browser gets the GenAI overview, whatever the experiment's kind tag says (MLflow 3.17)
        experiment = f"{base}/#/experiments/{run.info.experiment_id}"
        _, text = _page(f"{experiment}?workflowType=machine_learning")
        assert "Runs - Experiment" in text and "ui-check" in text and "matching runs" in text
        _, text = _page(experiment)
        assert "Traces" in text and "matching runs" not in text
    finally:
        kill_tree(server)

