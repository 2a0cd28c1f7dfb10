"""Sweeps on Ray Tune: the grid and its checks (fast), a 4-trial ASHA sweep with nested MLflow runs (heavy), and a
sweep whose driver is killed, resumed with its finished trial kept (faults)."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipelines.core.errors import ConfigError
from pipelines.core.reaper import alive
from pipelines.sweep import SweepSpec, Trial, load_space, parse_param, plan, trials

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.model_channels=8",
    "model.num_heads=1",
    "model.attention_resolutions=[]",
    "train.batch_size=16",
    "train.log_every=10",
    "train.sample_every=0",
    "optim.warmup_steps=0",
    "ray.num_workers=1",
    "mlflow.system_metrics=false",
    "mlflow.log_model=false",
]


# --- the grid and its checks ------------------------------------------------------------------------------------


def test_param_flags_parse_and_bad_ones_are_refused_in_words():
    assert parse_param("optim.lr=1e-3, 5e-4") == ("optim.lr", ["1e-3", "5e-4"])
    assert parse_param("model.channel_mult=[1,2]") == ("model.channel_mult", ["[1", "2]"])  # commas split values
    for bad in ("optim.lr", "lr=1e-3", "optim.lr=1e-3,,2e-3"):
        with pytest.raises(ConfigError, match=r"expected section\.key=value1,value2"):
            parse_param(bad)


def test_the_grid_runs_the_first_key_slowest_and_seeds_fastest():
    spec = SweepSpec("s", space={"optim.lr": ["1e-3", "5e-4"], "method.name": ["fm_ot", "otcfm"]}, seeds=[0, 1])
    grid = trials(spec)
    assert [(t.values["optim.lr"], t.values["method.name"], t.seed) for t in grid] == [
        (lr, m, s) for lr in ("1e-3", "5e-4") for m in ("fm_ot", "otcfm") for s in (0, 1)
    ]
    assert grid[0] == Trial("s-optim.lr=1e-3-method.name=fm_ot-s0", {"optim.lr": "1e-3", "method.name": "fm_ot"}, 0)
    assert grid[0].sets() == [
        "optim.lr=1e-3",
        "method.name=fm_ot",
        "train.seed=0",
        "train.run_name=s-optim.lr=1e-3-method.name=fm_ot-s0",
    ]
    assert len({t.name for t in grid}) == 8
    assert [t.name for t in trials(SweepSpec("only-seeds", seeds=[3, 4]))] == ["only-seeds-s3", "only-seeds-s4"]


def test_a_yaml_space_gives_params_and_seeds(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(
        "params:\n  optim.lr: [0.001, 0.0005]\n  model.channel_mult: [[1, 2], [1, 1]]\n"
        "  data.hflip: [true]\nseeds: [0, 2]\n"
    )
    assert load_space(str(f)) == (
        {"optim.lr": ["0.001", "0.0005"], "model.channel_mult": ["[1, 2]", "[1, 1]"], "data.hflip": ["true"]},
        [0, 2],
    )
    f.write_text("params:\n  optim.lr: 0.001\n")
    with pytest.raises(ConfigError, match="non-empty list of values"):
        load_space(str(f))
    f.write_text("params:\n  optim.lr: [0.001]\nseed: [0]\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) seed; allowed: params, seeds"):
        load_space(str(f))


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            SweepSpec("s", space={"train.seed": ["1", "2"]}),
            r"--param: 'train.seed' is not allowed; is set by the sweep for every trial .*use --seeds for seeds",
        ),
        (SweepSpec("s", scheduler="hyperband"), r"--scheduler: 'hyperband' is not allowed; allowed: fifo, asha"),
        (SweepSpec("s", metric="fid"), r"--metric: 'fid' is not allowed; allowed: val_loss, loss"),
        (SweepSpec("s", max_concurrent=0), r"--max-concurrent: 0 is not allowed; must be >= 1"),
        (SweepSpec("s", seeds=[0, 0]), r"--seeds: \[0, 0\] is not allowed; must be distinct integers"),
        (SweepSpec("a/b"), r"--name: 'a/b' is not allowed"),
        (
            SweepSpec("s", space={"optim.lr": ["1e-3", "5e-4", "1e-3"]}),
            r"--param: 'optim.lr=1e-3,5e-4,1e-3' is not allowed; repeats a value: "
            r"trials s-optim.lr=1e-3-s0 would be one run trained twice at once; give each value once",
        ),
        (
            SweepSpec("s", space={"method.time_sampling": ["uniform", "logit_normal"]}),
            r"--param: 'method.time_sampling' is not allowed; the sweep ranks its trials on val_loss, which each trial "
            r"computes under its own method.\* settings",
        ),
    ],
)
def test_bad_sweep_settings_are_refused_before_ray(spec, message):
    with pytest.raises(ConfigError, match=message):
        plan(spec)


def test_a_bad_trial_config_is_refused_naming_the_trial(tmp_path):
    base = [
        "data.shards=" + str(tmp_path / "nowhere"),
        f"train.storage_path={tmp_path}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
    ]
    with pytest.raises(ConfigError, match=r"trial s-optim.lr=-1-s0: optim.lr: -1.0 is not allowed; must be > 0"):
        plan(SweepSpec("s", "configs/digits-cpu.yaml", base, {"optim.lr": ["-1", "1e-3"]}))
    with pytest.raises(ConfigError, match=r"trial s-optim.lr=1e-3-s0: data.shards: .*nowhere"):
        plan(SweepSpec("s", "configs/digits-cpu.yaml", base, {"optim.lr": ["1e-3"]}))
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())  # nothing started


# --- real sweeps --------------------------------------------------------------------------------------------------


def test_trial_runs_end_as_the_sweep_saw_them(tmp_path):
    """A trial's MLflow run ends by what Tune did to it, whatever state the dying trial left it in: a stopped trial
    KILLED (also when its trainer saw the stop as an error and ended the run FAILED), a failed one FAILED, a finished
    one as it was. Each is tagged with its outcome."""
    from types import SimpleNamespace

    from pipelines.core.tracking import create_run
    from pipelines.sweep import _close_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    root = str(tmp_path / "sweep")
    left = {"stopped-running": "RUNNING", "stopped-failed": "FAILED", "failed": "RUNNING", "finished": "FINISHED"}
    ids = {}
    for name, status in left.items():
        ids[name] = create_run(uri, "sweep-close", name, {"flowray.storage": f"{root}/runs/{name}"})
        if status != "RUNNING":
            client.set_terminated(ids[name], status)
    p = SimpleNamespace(
        uri=uri, root=root, steps=60, base=SimpleNamespace(mlflow=SimpleNamespace(experiment="sweep-close"))
    )
    grid = [
        SimpleNamespace(config={"trial": {"name": name}}, metrics={"step": step}, error=error)
        for name, step, error in [
            ("stopped-running", 20, None),
            ("stopped-failed", 20, None),
            ("failed", 40, RuntimeError("boom")),
            ("finished", 60, None),
        ]
    ]
    assert _close_trial_runs(p, grid) == {
        "stopped-running": "stopped at step 20",
        "stopped-failed": "stopped at step 20",
        "failed": "failed",
        "finished": "finished",
    }
    ended = {name: client.get_run(i) for name, i in ids.items()}
    assert {name: run.info.status for name, run in ended.items()} == {
        "stopped-running": "KILLED",
        "stopped-failed": "KILLED",
        "failed": "FAILED",
        "finished": "FINISHED",
    }
    assert ended["stopped-failed"].data.tags["flowray.sweep.status"] == "stopped at step 20"


def _sweep_command(digits, tmp_path, name, *flags, sets=()):
    return [
        sys.executable,
        "-m",
        "jobs.sweep",
        "--config",
        "configs/digits-cpu.yaml",
        "--name",
        name,
        *flags,
        *[
            a
            for s in [
                *TINY,
                f"data.shards={digits}",
                f"train.storage_path={tmp_path / 'store'}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "mlflow.experiment=sweeps",
                *sets,
            ]
            for a in ("--set", s)
        ],
    ]


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags["mlflow.runName"]: r for r in runs}


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_an_asha_sweep_stops_the_bad_trials_and_logs_a_tree_of_runs(digits, tmp_path, own_ray):
    """4 trials (lr 2e-3 and 1e-6, seeds 0 and 1), 2 at a time, ASHA on the validation loss with rungs at steps 20
    and 40: the trials at lr 1e-6, far behind on val_loss at step 20, are stopped there; the first trial to reach
    each rung always goes on, so one at lr 2e-3 finishes. Every trial is an MLflow run nested under the sweep's."""
    cmd = _sweep_command(
        digits,
        tmp_path,
        "asha",
        "--param",
        "optim.lr=2e-3,1e-6",
        "--seeds",
        "0,1",
        "--scheduler",
        "asha",
        "--max-concurrent",
        "2",
        sets=["train.steps=60", "train.checkpoint_every=20"],
    )
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    statuses = result["statuses"]
    assert len(statuses) == 4
    assert statuses["asha-optim.lr=1e-6-s0"] == statuses["asha-optim.lr=1e-6-s1"] == "stopped at step 20"
    assert "finished" in {statuses["asha-optim.lr=2e-3-s0"], statuses["asha-optim.lr=2e-3-s1"]}

    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["flowray.kind"] == "sweep"
    assert parent.data.params["sweep.scheduler"] == "asha" and parent.data.params["sweep.trials"] == "4"
    children = _children(client, parent.info.run_id)
    assert set(children) == set(statuses)
    for name, run in children.items():
        assert run.data.tags["flowray.sweep.status"] == statuses[name]
        assert run.data.tags["flowray.kind"] == "train"
        if statuses[name] == "finished":
            assert run.info.status == "FINISHED"
            assert _steps(client, run.info.run_id, "val_loss") == [20, 40, 60]
        else:  # stopped by the scheduler: its run ended KILLED, with every value up to the step it was stopped at
            assert run.info.status == "KILLED"
            stopped = int(statuses[name].rsplit(" ", 1)[1])
            assert _steps(client, run.info.run_id, "val_loss")[-1] == stopped
            assert _steps(client, run.info.run_id, "loss")[-1] == stopped
    # the same held-out rows and draws for every trial: at step 20 the tiny lr is far behind
    at_20 = {n: client.get_metric_history(r.info.run_id, "val_loss")[0].value for n, r in children.items()}
    assert max(at_20["asha-optim.lr=2e-3-s0"], at_20["asha-optim.lr=2e-3-s1"]) < min(
        at_20["asha-optim.lr=1e-6-s0"], at_20["asha-optim.lr=1e-6-s1"]
    )

    # the sweep's run ends with the trials' table (best first) and their curves
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.csv", "val_loss-vs-step.png"} <= files
    table = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 and rows[0]["status"] == "finished"
    best = [float(r["best_val_loss"]) for r in rows]
    assert best == sorted(best)
    assert parent.data.tags["flowray.sweep.best_trial"] == rows[0]["trial"]
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best[0])


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(900)
def test_a_killed_sweep_resumes_with_its_finished_trial_kept(digits, tmp_path, own_ray):
    """Two trials one at a time; the driver is SIGKILLed while the second trains. The same command again restores
    the sweep (Tune's restore): the finished trial is not trained again (one MLflow run, one value per step), the
    second continues its Ray Train run and MLflow run from its last checkpoint, and the sweep's run is the same."""
    cmd = _sweep_command(
        digits,
        tmp_path,
        "killed",
        "--param",
        "optim.lr=2e-3,1e-3",
        "--max-concurrent",
        "1",
        sets=["train.steps=40", "train.checkpoint_every=10"],
    )
    second = tmp_path / "store" / "killed" / "runs" / "killed-optim.lr=1e-3-s0"
    log = tmp_path / "driver.log"
    with open(log, "w") as err:
        driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 600
            while not list(second.glob("checkpoint_*")):  # the second trial has a checkpoint: the first is done
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the second trial never checkpointed"
                time.sleep(0.2)
            ray_procs = [
                p
                for p in psutil.Process(driver.pid).children(recursive=True)
                if "pipelines.core.reaper" not in " ".join(p.cmdline())
            ]
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            deadline = time.monotonic() + 15
            while any(alive(p) for p in ray_procs) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            driver.kill()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first_before = client.search_runs(
        [client.get_experiment_by_name("sweeps").experiment_id],
        filter_string="tags.`mlflow.runName` = 'killed-optim.lr=2e-3-s0'",
    )
    assert len(first_before) == 1 and first_before[0].info.status == "FINISHED"

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "restoring sweep killed" in rerun.stderr
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["statuses"] == {"killed-optim.lr=2e-3-s0": "finished", "killed-optim.lr=1e-3-s0": "finished"}
    children = _children(client, result["parent_run_id"])
    assert set(children) == set(result["statuses"])  # one MLflow run per trial: the same parent, no new ones
    first = children["killed-optim.lr=2e-3-s0"]
    assert first.info.run_id == first_before[0].info.run_id and first.info.end_time == first_before[0].info.end_time
    for run in children.values():
        assert run.info.status == "FINISHED"
        assert _steps(client, run.info.run_id, "val_loss") == [10, 20, 30, 40]
        assert _steps(client, run.info.run_id, "loss") == [10, 20, 30, 40]
