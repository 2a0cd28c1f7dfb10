import subprocess
import sys


def test_fm_does_not_import_ray_or_mlflow():
    code = "import sys, fm, fm.likelihood, fm.metrics, fm.data, fm.ema; " \
           "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
