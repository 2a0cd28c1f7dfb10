"""Sample quality while training (`train.eval_every`) on the session's trained run (`trained_digits`, with a sampling
run nested under it): each scored checkpoint's FD and bits/dim in the training run at its step, the last equal to
what `flowray sample` + `flowray evaluate` give on the same checkpoint and settings; then MLflow's own UI over that
store, `mlflow ui` as the README starts it (on loopback only), rendered by a real browser (Debian's headless
Chromium): what a user opening the link a job prints sees. In `make heavy`, beside the training story, which reads the
same run: it is trained once."""

import re
import shutil
import subprocess
import tempfile

import pytest
from conftest import TRAINED_RUN
from mlflow.tracking import MlflowClient
from pipeline_helpers import LOOPBACK, free_port, kill_tree, listening_addresses, wait_until_healthy

from pipelines.batch.evaluate import run_evaluation
from pipelines.core.errors import ConfigError
from pipelines.core.manifest import Manifest
from pipelines.core.tracking import ui_link
from pipelines.ingest.run import load_manifest
from pipelines.train.config import load_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["train.checkpoint_every=4", "train.eval_every=6"],
            r"train.eval_every: 6 is not allowed; must be 0 \(off\) or a multiple of train.checkpoint_every=4",
        ),
        (
            ["train.eval_every=200", "train.eval_solver=sde"],
            r"train.eval_solver: 'sde' is not allowed; allowed: dopri5",
        ),
        (["train.eval_every=200", "train.eval_samples=1"], r"train.eval_samples: 1 is not allowed; must be >= 2"),
    ],
)
def test_bad_quality_settings_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits-cpu.yaml", sets)


@pytest.fixture(scope="module")
def trained(trained_digits):
    """The session's trained run (`trained_digits`): `flowray train` of 8 steps scored at steps 4 and 8, and
    `flowray sample` of its final checkpoint with the settings `train.eval_*` stand for, all in server.db."""
    return trained_digits


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_quality_is_logged_at_each_scored_step_and_agrees_with_the_batch_jobs(trained):
    client, run_id = MlflowClient(trained["uri"]), trained["train"]["run_id"]
    history = {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("eval/fd", "eval/fd_floor", "eval/bpd", "eval/sample_nfe", "eval/straightness")
    }
    assert [s for s, _ in history["eval/fd"]] == [4, 8] and [s for s, _ in history["eval/bpd"]] == [4, 8]
    assert client.get_run(run_id).info.status == "FINISHED"
    # the same checkpoint's samples (`flowray sample`) through `flowray evaluate`'s function and settings
    ev = run_evaluation(
        trained["train"]["checkpoint"],
        Manifest.load(str(trained["digits"])),
        trained["sample"]["out"],
        trained["eval_config"],
    )
    assert history["eval/fd"][-1][1] == pytest.approx(ev.quality.fd, rel=1e-4)
    assert history["eval/fd_floor"][-1][1] == pytest.approx(ev.quality.fd_floor, rel=1e-4)
    assert history["eval/bpd"][-1][1] == pytest.approx(ev.likelihood.mean, rel=1e-4)
    assert history["eval/sample_nfe"][-1][1] == trained["sample"]["mean_nfe"]
    assert history["eval/straightness"][-1][1] == pytest.approx(ev.straightness.straightness, rel=1e-4)


def _page(url: str, budget_s: int = 25) -> tuple[str, str]:
    """The DOM after the page's scripts ran (`budget_s` of virtual time), and its visible text in one line, in a fresh
    browser profile (the UI keeps choices such as its view in the browser's storage).

    `--run-all-compositor-stages-before-draw` makes headless Chromium lay out and draw every frame under virtual time.
    Without it the UI's charts, which render only once an IntersectionObserver sees them on screen, were drawn in
    about 7 of 10 loads of one page at 25 or 60 s (and in none of three on CI's host at stop 47); with it, in 26 of 26
    on this host, 14 of them beside two busy cores."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--run-all-compositor-stages-before-draw",
                f"--user-data-dir={profile}",
                "--window-size=1600,1200",
                f"--virtual-time-budget={budget_s * 1000}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60 + 4 * budget_s,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", out.stdout))
    return out.stdout, text


def _charts(url: str) -> tuple[int, str]:
    """How many Plotly figures the page draws, and its text. The charts come after the metric histories' requests and
    Plotly's own bundle, which a slow machine may not finish in 25 s of virtual time: longer budgets before a zero."""
    for budget_s in (25, 60, 120):
        dom, text = _page(url, budget_s)
        if dom.count('class="main-svg"'):
            break
    return dom.count('class="main-svg"'), text


@pytest.fixture(scope="module")
def mlflow_ui(trained):
    """`mlflow ui` over the trained run's store, started as the README starts it (no --host): its URL and process."""
    import sys

    port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            f"sqlite:///{trained['tmp'] / 'server.db'}",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until_healthy(f"http://127.0.0.1:{port}", ui, "mlflow ui")
    yield f"http://127.0.0.1:{port}", ui
    kill_tree(ui)


@pytest.mark.slow
@pytest.mark.heavy
def test_mlflow_ui_as_the_readme_starts_it_listens_on_loopback_only(mlflow_ui):
    import psutil

    url, ui = mlflow_ui
    port = int(url.rsplit(":", 1)[1])
    sockets = listening_addresses({ui.pid, *(p.pid for p in psutil.Process(ui.pid).children(recursive=True))})
    assert any(port == p for _, p, _ in sockets)
    assert {s for s in sockets if s[0] not in LOOPBACK} == set()


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(900)
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_run_page_shows_dataset_source_child_runs_and_charts(trained, mlflow_ui):
    uri, digits, sampled = trained["uri"], trained["digits"], trained["sample"]
    trained = trained["train"]
    run = MlflowClient(uri).get_run(trained["run_id"])
    base, _ = mlflow_ui
    link = ui_link(base, trained["run_id"])
    assert link.endswith(f"/runs/{trained['run_id']}?workflowType=machine_learning")
    _, text = _page(link)
    digest = load_manifest(digits).digest("train")[:8]
    assert "Datasets digits/train" in text and digest in text  # the MLflow dataset input, by digest
    assert f"Source {run.data.tags['mlflow.source.name']}" in text
    assert "Child runs sample-dopri5" in text  # the sampling run, nested under the training run
    assert "Description fm_ot on digits/train, 8 steps of 16 x 2 workers" in text
    assert f"Created by {run.data.tags['mlflow.user']}" in text and "Status Finished" in text
    assert sampled["mlflow_run_id"] in {
        r.info.run_id
        for r in MlflowClient(uri).search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{trained['run_id']}'"
        )
    }

    # the metric charts render (Plotly's figures) in the model-training view the link selects. What a link
    # without `workflowType` shows is MLflow's choice (the GenAI view here, the training view on CI's machine):
    # not asserted, it is not ours
    charts, text = _charts(link.replace("?", "/model-metrics?"))
    assert charts >= 2 and "Model metrics" in text, text[-3000:]

    # the experiment opens on its runs table in the model-training view when the link says so
    experiment = f"{base}/#/experiments/{run.info.experiment_id}"
    _, text = _page(f"{experiment}?workflowType=machine_learning")
    assert "Runs - Experiment" in text and TRAINED_RUN in text and "matching runs" in text
