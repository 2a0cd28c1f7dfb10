"""The `flowray` console script: every job under one command, with the jobs' own flags and exit statuses."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.flowray import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
FLOWRAY = Path(sys.executable).parent / "flowray"  # installed by `pip install -e .` ([project.scripts])


def _flowray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FLOWRAY), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_job_is_a_command():
    jobs = {p.stem for p in (ROOT / "jobs").glob("*.py")} - {"__init__", "cli", "flowray"}
    assert {module.removeprefix("jobs.") for module, _, _ in COMMANDS.values()} == jobs
    for module, _, example in COMMANDS.values():
        assert callable(importlib.import_module(module).main)
        assert example.startswith("flowray ")
    out = _flowray("--help")
    assert out.returncode == 0 and all(f"  {name} " in out.stdout for name in COMMANDS)


def test_a_command_takes_its_job_s_flags_and_exit_statuses():
    dry = _flowray("train", "--config", "configs/digits-cpu.yaml", "--set", "train.steps=7", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["train"]["steps"] == 7
    helped = _flowray("train", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: flowray train ")
    bad = _flowray("train", "--set", "train.steps=zero")
    assert bad.returncode == 2 and bad.stderr.strip() == "training failed: train.steps: 'zero' is not a valid int"
    unknown = _flowray("tran")
    assert unknown.returncode == 2 and unknown.stderr.startswith("flowray: unknown command 'tran'; commands: ingest,")
    assert "Traceback" not in bad.stderr + unknown.stderr


@pytest.mark.parametrize(
    "job,section,config", [("sample", "sample", "SampleConfig"), ("evaluate", "eval", "EvalConfig")]
)
def test_a_jobs_help_lists_every_key_of_its_section_with_its_default(job, section, config, capsys):
    """The key list of --help comes from the section's dataclass, so it cannot drift from the code."""
    import dataclasses

    import pipelines.batch.config as batch_config

    with pytest.raises(SystemExit):
        importlib.import_module(f"jobs.{job}").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = getattr(batch_config, config)()
    listed = text.split(f"Keys ({section}.*, default in brackets): ", 1)[1]
    for f in dataclasses.fields(defaults):
        assert f"{f.name} [{getattr(defaults, f.name)!r}]" in listed, f.name
