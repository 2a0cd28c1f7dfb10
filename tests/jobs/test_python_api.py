"""The README's Python snippet, run exactly as written (in a scratch folder holding a copy of the repository's configs),
in this process on the session's Ray, as a user runs it in a notebook that has one."""

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(900)]


def test_the_readme_snippet_trains_samples_and_evaluates(tmp_path, monkeypatch, ray_local):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- python-api -->\n```python\n(.*?)```", readme, re.S).group(1)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # the snippet's relative paths land in tmp_path
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: outputs/mlflow.db
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md (python-api)", "exec"), {"__name__": "__main__"})
    pattern = r"([\d.]+) bits/dim; FD \(digits classifier\) ([\d.]+) \(floor ([\d.]+)\)"
    lines = [m for m in (re.fullmatch(pattern, line) for line in printed.getvalue().strip().splitlines()) if m]
    assert len(lines) == 1, printed.getvalue()[-3000:]
    bpd, fd, floor = map(float, lines[0].groups())
    assert 0 < bpd < 9 and fd > floor > 0  # 20 steps of training: far from the data, and measured against the floor
    assert (tmp_path / "outputs" / "mlflow.db").exists()
    assert len(list((tmp_path / "outputs" / "samples" / "api").glob("block-*.parquet"))) == 1
