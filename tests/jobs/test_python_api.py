"""The README's Python snippet, run exactly as written (in a scratch copy of the repository's configs)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(900)]


def test_the_readme_snippet_trains_samples_and_evaluates(tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- python-api -->\n```python\n(.*?)```", readme, re.S).group(1)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # the snippet's relative paths land in tmp_path
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=840)
    assert out.returncode == 0, out.stderr[-3000:]
    # the snippet's line; Ray's raylet may print its own warnings to the driver's stdout around it
    pattern = r"([\d.]+) bits/dim; FD \(digits classifier\) ([\d.]+) \(floor ([\d.]+)\)"
    lines = [m for m in (re.fullmatch(pattern, line) for line in out.stdout.strip().splitlines()) if m]
    assert len(lines) == 1, out.stdout[-3000:]
    found = lines[0]
    bpd, fd, floor = map(float, found.groups())
    assert 0 < bpd < 9 and fd > floor > 0  # 20 steps of training: far from the data, and measured against the floor
    assert (tmp_path / "outputs" / "mlflow.db").exists()
    assert len(list((tmp_path / "outputs" / "samples" / "api").glob("block-*.parquet"))) == 1
