"""Defects of the house, each pinned: settings that used to pass validation and then fail inside a Ray actor,
a cache that ignored its settings, run output in the source tree, and randomness outside the step's generator."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import before_ray, make_checkpoint

from fm.methods import METHODS, make_method, methods_markdown
from fm.metrics import wasserstein2
from fm.models import MLP
from pipelines.batch.config import EvalConfig, SampleConfig, validate_eval_config
from pipelines.core.errors import ConfigError
from pipelines.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "method, sigma, sde_g, message",
    [
        ("fm_ot", None, 0.0, "g = 0 selects the reverse VP SDE, but method 'fm_ot' is not on the VP path"),
        ("otcfm", None, 0.5, "method 'otcfm' has no Gaussian marginal path"),
        ("sbcfm", None, 0.5, "method 'sbcfm' has no Gaussian marginal path"),
        ("icfm", 0.1, 0.5, "method 'icfm' has no Gaussian marginal path"),
    ],
)
def test_sde_settings_a_method_cannot_take_are_refused_before_ray(tmp_path, method, sigma, sde_g, message):
    from pipelines.batch.sample import run_sampling

    ckpt = make_checkpoint(tmp_path / "ckpt", method=method)
    if sigma is not None:  # checkpoints store the method's arguments
        meta = (ckpt / "meta.json").read_text().replace(f'"name": "{method}"', f'"name": "{method}", "sigma": {sigma}')
        (ckpt / "meta.json").write_text(meta)
    with (
        before_ray(),
        pytest.raises(
            ConfigError,
            match=f"sample.sde_g: {sde_g} is not allowed with "
            f"sample.solver=sde for this {method} checkpoint: {message}",
        ),
    ):
        run_sampling(str(ckpt), tmp_path / "out", SampleConfig(num_samples=4, solver="sde", sde_g=sde_g))
    assert not (tmp_path / "out").exists()


def test_one_method_answers_which_diffusions_it_takes():
    # the actor builds its g(t) with the same method that validation asks
    t = torch.tensor([0.0, 0.5])
    vp = make_method("fm_vp").sde_diffusion(0.0)(t)
    torch.testing.assert_close(vp, torch.sqrt(0.1 + (1 - t) * 19.9))
    torch.testing.assert_close(make_method("fm_ot").sde_diffusion(0.3)(t), torch.full((2,), 0.3))
    torch.testing.assert_close(make_method("icfm").sde_diffusion(0.3)(t), torch.full((2,), 0.3))  # sigma 0: OT path
    with pytest.raises(ValueError, match="must be >= 0"):
        make_method("fm_vp").sde_diffusion(-1.0)


def test_eval_solver_settings_are_checked_before_ray(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"eval.steps: fixed-step method 'euler' needs steps \(an integer >= 1\)"):
        validate_eval_config(EvalConfig(solver="euler"))
    with pytest.raises(ConfigError, match="eval.solver: unknown ODE method 'rk45'"):
        validate_eval_config(EvalConfig(solver="rk45"))
    validate_eval_config(EvalConfig(solver="euler", steps=10))
    from jobs.evaluate import main

    ckpt = make_checkpoint(tmp_path / "ckpt")
    for override, message in [
        ("eval.method=euler", "unknown key eval.method; allowed in eval: split"),
        ("eval.solver=euler", "eval.steps: fixed-step method 'euler' needs steps"),
    ]:
        with before_ray(), pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", str(ckpt), "--data", str(tmp_path), "--no-mlflow", "--set", override])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_classifier_cache_is_keyed_by_its_settings(digits_copy):
    from pipelines.batch.classifier import get_classifier
    from pipelines.ingest.run import load_manifest

    manifest = load_manifest(digits_copy)
    _, one = get_classifier(manifest, epochs=1, seed=0)
    _, two = get_classifier(manifest, epochs=2, seed=0)
    _, seeded = get_classifier(manifest, epochs=1, seed=1)
    assert (one["epochs"], two["epochs"], seeded["seed"]) == (1, 2, 1)
    assert len({one["path"], two["path"], seeded["path"]}) == 3
    _, again = get_classifier(manifest, epochs=2, seed=0)
    assert again == two  # the cached one, not retrained


def test_every_adaptive_solver_is_a_point_in_the_plot():
    from pipelines.compare import plot_series

    rows = [
        {"method": "fm_ot", "solver": s, "sample_nfe": n, "fd": 1.0, "fd_label": "FD"}
        for s, n in [("euler", 10), ("euler", 2), ("bosh3", 40), ("dopri5", 60)]
    ]
    series = plot_series(rows)["fm_ot"]
    assert [r["sample_nfe"] for r in series["fixed"]] == [2, 10]
    assert [r["solver"] for r in series["adaptive"]] == ["bosh3", "dopri5"]


def test_wasserstein2_takes_tensors_that_carry_gradients():
    x = torch.randn(30, 2, requires_grad=True)
    assert wasserstein2(x, x.detach() + 1.0) == pytest.approx(1.0 * np.sqrt(2), rel=1e-6)


def test_sbcfm_draws_its_pairs_from_the_step_generator_and_has_a_default():
    method = make_method("sbcfm")
    assert method.path.sigma == 1.0 and method.coupling.reg == 2.0  # torchcfm's default, reg = 2 sigma^2
    model = MLP(dim=2, hidden=16, depth=2)
    x_1 = torch.randn(64, 2)
    losses = []
    for scramble in (1, 2):
        torch.manual_seed(scramble)  # the global generator must not matter
        losses.append(method.loss(model, x_1, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    cfg = load_config("configs/toy2d.yaml", ["method.name=sbcfm"])
    assert cfg.method.sigma is None  # the method's default
    with pytest.raises(ConfigError, match="method: sbcfm needs sigma > 0"):
        load_config("configs/toy2d.yaml", ["method.name=sbcfm", "method.sigma=0"])


def test_the_registry_is_the_readme_s_table():
    assert methods_markdown() in (ROOT / "README.md").read_text()
    assert set(METHODS) == {
        "fm_ot",
        "fm_vp",
        "score_vp",
        "icfm",
        "otcfm",
        "sbcfm",
        "meanflow",
        "reflow",
        "distill",
        "rfm",
        "am",
        "snapshot_icfm",
        "snapshot_otcfm",
    }


def test_no_run_output_is_tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    run_output = [
        f for f in files if f.endswith((".pt", ".db", ".ckpt")) or f.startswith(("mlartifacts/", "mlruns/", "outputs/"))
    ]
    assert run_output == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_run_from_a_clean_checkout_writes_only_under_outputs(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy(ROOT / ".gitignore", work / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["git", "add", ".gitignore"], cwd=work, check=True)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.sample",
            "--checkpoint",
            str(ckpt),
            "--num-samples",
            "8",
            "--out",
            "outputs/samples",
            "--set",
            "sample.solver=euler",
            "--set",
            "sample.steps=2",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # a successful run prints no error line (Ray's known non-errors are filtered: pipelines.core.console.KNOWN_NOISE)
    assert not re.search(r"^\[[^\]]* [EF] \d+ \d+\]", out.stderr, re.M), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in work.iterdir()) == [".git", ".gitignore", "outputs"]
    assert (work / "outputs" / "mlflow.db").exists() and (work / "outputs" / "mlartifacts").is_dir()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=work, capture_output=True, text=True).stdout
    assert status.strip() == "A  .gitignore"


def test_the_manifest_is_read_once_into_a_checked_type(tmp_path, digits_copy):
    from pipelines.core.manifest import Manifest, ManifestError

    digits_copy.rename(tmp_path / "d")
    m = Manifest.load(tmp_path / "d")
    assert (m.data.kind, m.data.shape, m.data.model_shape, m.data.name) == ("image", [8, 8, 1], [1, 8, 8], "digits")
    assert m.count("train") + m.count("test") == 1797 and len(m.shard_paths("train")) == 2
    path = tmp_path / "d" / "manifest.json"
    good = path.read_text()
    path.write_text(good.replace('"shape": [\n  8,\n  8,\n  1\n ]', '"shape": "8x8"'))
    with pytest.raises(ManifestError, match=r"manifest.json: shape '8x8' is not allowed; image rows need a list of 3"):
        Manifest.load(tmp_path / "d")
    path.write_text(good[:-20])
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        Manifest.load(tmp_path / "d")
    with pytest.raises(ConfigError, match="data.shards: .*manifest.json: not valid JSON"):
        from pipelines.train.against_data import check_data

        check_data(load_config("configs/digits-cpu.yaml", [f"data.shards={tmp_path / 'd'}"]))
