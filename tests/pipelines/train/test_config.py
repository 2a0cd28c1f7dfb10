import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core.errors import ConfigError
from pipelines.core.manifest import DataSpec
from pipelines.train.against_data import check_data
from pipelines.train.config import Config, load_config, model_kwargs


def test_defaults_yaml_and_overrides(tmp_path):
    cfg = load_config("configs/digits-cpu.yaml", ["train.steps=7", "model.channel_mult=[1, 1]", "ray.use_gpu=true"])
    assert cfg.train.steps == 7 and cfg.model.channel_mult == [1, 1] and cfg.ray.use_gpu is True
    assert cfg.flat()["method.name"] == "fm_ot"


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.name=fm", "method.name: 'fm' is not allowed; allowed: fm_ot, fm_vp, score_vp, icfm, otcfm, sbcfm"),
        ("train.steps=0", "train.steps: 0 is not allowed; must be >= 1"),
        ("train.steps=ten", "train.steps: 'ten' is not a valid int"),
        ("optim.lr=-1", "optim.lr: -1.0 is not allowed; must be > 0"),
        ("train.bogus=1", "unknown key train.bogus; allowed in train: steps, batch_size"),
        ("trian.steps=1", "unknown section 'trian'; allowed: data, model"),
        ("method.ot_scope=world", "method.ot_scope: 'world' is not allowed; allowed: local, global"),
        (
            "train.fail_at_step=2 train.fail_rank=5",
            "train.fail_rank: 5 is not allowed; must be a worker rank in [0, 1]",
        ),
        ("steps=3", "override 'steps=3' must look like section.key=value"),
        (
            "ray.stream_chunk_tasks=-1",
            "ray.stream_chunk_tasks: -1 is not allowed; must be >= 0 (0: one dataset for the whole run)",
        ),
        ("method.time_sampling=beta", "method.time_sampling: 'beta' is not allowed; allowed: uniform, logit_normal"),
        (
            "method.time_loc=0.5",
            "method.time_loc: 0.5 is not allowed; only method.time_sampling=logit_normal reads it "
            "(with uniform: keep 0.0)",
        ),
        ("method.time_sampling=logit_normal method.time_scale=0", "method.time_scale: 0.0 is not allowed; must be > 0"),
        ("train.precision=fp8", "train.precision: 'fp8' is not allowed; allowed: auto, fp32, bf16, fp16"),
        (
            "train.precision=fp16",
            "train.precision: 'fp16' is not allowed; fp16 needs a GPU (ray.use_gpu=true): CPUs "
            "have no fast fp16 and its gradients need a scaler; use fp32 or bf16 on CPU",
        ),
        (
            "train.channels_last=true model.name=mlp",
            "train.channels_last: True is not allowed; a memory format of image "
            "batches: it needs model.name=unet, not mlp",
        ),
        # bounds of keys that could otherwise only fail after Ray started, or after training
        (
            "train.num_to_keep=0",
            "train.num_to_keep: 0 is not allowed; must be >= 1 (checkpoints kept; a resume needs one)",
        ),
        ("train.grid_steps=0", "train.grid_steps: 0 is not allowed; must be >= 1 (Euler steps of the sample grid)"),
        (
            "method.meanflow_ratio=0.5",
            "method.meanflow_ratio: 0.5 is not allowed; must be in [0, 1], and only "
            "method.name=meanflow reads it (otherwise keep 0.25)",
        ),
        (
            "method.name=meanflow method.meanflow_ratio=1.5",
            "method.meanflow_ratio: 1.5 is not allowed; must be in [0, 1]",
        ),
        (
            "method.name=meanflow method.meanflow_p=-1",
            "method.meanflow_p: -1.0 is not allowed; must be finite and >= 0",
        ),
        (
            "method.name=meanflow model.dropout=0.1",
            "model.dropout: 0.1 is not allowed; must be 0 with meanflow: its "
            "target's forward pass and its loss's would draw different dropout "
            "masks",
        ),
        (
            "method.name=meanflow train.eval_every=200",
            "train.eval_solver: 'dopri5' is not allowed; meanflow samples in 'jump's (train.eval_steps of them)",
        ),
        (
            "train.eval_every=200 train.eval_solver=jump",
            "train.eval_solver: 'jump' is not allowed; 'jump' is MeanFlow's "
            "sampler (and distill's); fm_ot gives a velocity field: use an ODE solver",
        ),
        (
            "method.name=distill method.time_sampling=logit_normal",
            "method.time_sampling: 'logit_normal' is not allowed; distill trains at t = 0 only and draws no times; "
            "allowed: uniform",
        ),
        (
            "method.name=distill train.eval_every=200 train.eval_solver=jump train.eval_steps=2",
            "train.eval_steps: 2 is not allowed; distill is a one-step map: it samples in one jump; allowed: 1",
        ),
        ("train.ema_snapshot_every=-1", "train.ema_snapshot_every: -1 is not allowed; must be >= 0 (0: off)"),
        (
            "train.ema_snapshot_every=1 train.steps=5000",
            "train.ema_snapshot_every: 1 is not allowed; gives 5000 "
            "snapshots of 5000 steps; at most 1000 are kept per run: take at "
            "least 5",
        ),
        (
            "optim.ema_sigma_rels=[0.05,0.3]",
            "optim.ema_sigma_rels: [0.05, 0.3] is not allowed; must be a non-empty list "
            "of distinct values in (0, 0.2887)",
        ),
        (
            "optim.ema_sigma_rels=[0.1,0.1]",
            "optim.ema_sigma_rels: [0.1, 0.1] is not allowed; must be a non-empty list "
            "of distinct values in (0, 0.2887)",
        ),
        (
            "optim.ema_sigma_rels=[]",
            "optim.ema_sigma_rels: [] is not allowed; must be a non-empty list of distinct values in (0, 0.2887)",
        ),
        ("method.beta_min=0", "method.beta_min: 0.0 is not allowed; must be > 0"),
        ("method.beta_max=0.05", "method.beta_max: 0.05 is not allowed; must be finite and > method.beta_min=0.1"),
        ("optim.weight_decay=-1", "optim.weight_decay: -1.0 is not allowed; must be finite and >= 0"),
        ("ray.prefetch_batches=-1", "ray.prefetch_batches: -1 is not allowed; must be >= 0"),
        ("ray.local_cpus=0", "ray.local_cpus: 0 is not allowed; must be >= 1"),
        (
            "ray.use_gpu=true ray.gpus_per_worker=0",
            "ray.gpus_per_worker: 0.0 is not allowed; must be > 0 with ray.use_gpu=true",
        ),
        ("mlflow.flush_timeout_s=-5", "mlflow.flush_timeout_s: -5.0 is not allowed; must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/digits-cpu.yaml", override.split(" "))
    assert message in str(err.value)


def test_data_checks_before_ray(tmp_path, digits_copy):
    digits_copy.rename(tmp_path / "d")
    cfg = load_config(None, [f"data.shards={tmp_path / 'd'}", "model.channel_mult=[1, 2, 2, 2, 2]"])
    with pytest.raises(ConfigError, match=r"model.channel_mult: .*5 levels need the image size 8 divisible by 16"):
        check_data(cfg)
    cfg = load_config(None, [f"data.shards={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="data.shards: .*manifest.json not found"):
        check_data(cfg)


def test_cli_dry_run_and_error_exit(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            "--config",
            "configs/digits-cpu.yaml",
            "--dry-run",
            "--set",
            "train.steps=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and '"steps": 3' in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", "configs/digits-cpu.yaml", "--set", "method.name=nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "training failed: method.name: 'nope' is not allowed" in bad.stderr
    assert "ray" not in bad.stderr.lower().replace("array", "")  # it failed before Ray was started


def test_every_preset_loads():
    from pathlib import Path

    names = sorted(p.stem for p in Path("configs").glob("*.yaml"))
    assert names == [
        "cifar10",
        "digits-cpu",
        "fashion-mnist",
        "fashion-mnist-cpu",
        "snapshots",
        "sphere",
        "torus",
        "toy2d",
    ]
    for name in names:
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.train.run_name
        assert cfg.ray.max_failures >= 2  # a crashed worker is recovered, in every preset
    cifar = load_config("configs/cifar10.yaml")
    assert cifar.model.model_channels == 256
    # Lipman et al. Table 3: lr 5e-4, polynomial decay after 45k warm-up steps
    assert (cifar.optim.lr, cifar.optim.warmup_steps, cifar.optim.schedule) == (5e-4, 45000, "polynomial")


def test_the_published_json_schema_is_the_config_s_and_every_preset_passes_it():
    import json

    import jsonschema
    import yaml

    from pipelines.train.config import schema

    root = Path(__file__).resolve().parents[3]
    published = json.loads((root / "configs" / "train.schema.json").read_text())
    assert published == schema(), "regenerate: python -m jobs.train --schema > configs/train.schema.json"
    validator = jsonschema.Draft202012Validator(published)
    presets = sorted((root / "configs").glob("*.yaml"))
    assert len(presets) >= 8
    for preset in presets:
        assert preset.read_text().startswith("# yaml-language-server: $schema=train.schema.json\n"), preset
        validator.validate(yaml.safe_load(preset.read_text()))
        load_config(preset)  # and the loader agrees
    # what the loader refuses, the schema refuses too: an unknown key, a wrong type, a name outside its registry
    for bad in (
        {"train": {"stepz": 3}},
        {"train": {"steps": "many"}},
        {"method": {"name": "nope"}},
        {"trian": {"steps": 3}},
        {"model": {"channel_mult": [1, "x"]}},
    ):
        assert not validator.is_valid(bad), bad
    assert validator.is_valid({"method": {"sigma": None}, "model": {"channel_mult": [1, 2, 2]}})
    assert published["properties"]["train"]["properties"]["steps"]["default"] == Config().train.steps


@pytest.mark.parametrize(
    "item, value",
    [
        ("train.steps=12", 12),
        ("train.steps=12.0", 12),
        ("optim.lr=1e-3", 1e-3),
        ("optim.lr=3", 3.0),
        ("data.hflip=yes", True),
        ("data.hflip=0", False),
        ("method.sigma=null", None),
        ("method.sigma=0.5", 0.5),
        ("optim.decay_steps=400", 400),
        ("model.channel_mult=[1, 2, 2]", [1, 2, 2]),
        ("model.channel_mult=3", [3]),
        ("train.run_name=123", "123"),
    ],
)
def test_values_are_coerced_by_the_field_s_type(item, value):
    section, key = item.split("=")[0].split(".")
    got = getattr(getattr(load_config(None, [item]), section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.steps=2.5", "train.steps: 2.5 is not a valid int"),
        ("train.steps=true", "train.steps: True is not a valid int"),
        ("optim.lr=false", "optim.lr: False is not a valid float"),
        ("data.hflip=maybe", "data.hflip: 'maybe' is not a valid bool"),
        ("method.sigma=high", "method.sigma: 'high' is not a valid float | None"),
        ("model.channel_mult=[1, x]", "model.channel_mult: [1, 'x'] is not a valid list[int]"),
        ("train.steps=null", "train.steps: null is not allowed (expected int)"),
    ],
)
def test_values_of_the_wrong_type_are_named_with_the_type(item, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert str(err.value) == message


@pytest.mark.parametrize(
    "sample, method, message",
    [
        (
            {"solver": "dopri5", "time_grid": "edm"},
            None,
            r"^sample.time_grid: 'edm' is not allowed; places fixed steps; sample.solver=dopri5 chooses its own: use "
            r"uniform$",
        ),
        (
            {"solver": "sde", "time_grid": "edm"},
            None,
            r"^sample.time_grid: 'edm' is not allowed; places fixed steps; sample.solver=sde steps uniformly in its "
            r"own scheme: use uniform$",
        ),
        ({"time_grid": "karras"}, None, r"^sample.time_grid: 'karras' is not allowed; allowed: uniform, edm$"),
        (
            {"solver": "euler", "time_grid": "edm"},
            "rfm",
            r"^sample.time_grid: 'edm' is not allowed; rfm is a riemannian method, whose path is not a flow from noise "
            r"to data: use uniform$",
        ),
    ],
)
def test_a_time_grid_is_refused_where_no_fixed_steps_from_noise_are_placed(sample, method, message):
    from pipelines.batch.config import SampleConfig, validate_sample_config

    with pytest.raises(ConfigError, match=message):
        validate_sample_config(SampleConfig(**sample), method)
    validate_sample_config(SampleConfig(solver="heun2", steps=4, time_grid="edm"), "otcfm")
    validate_sample_config(SampleConfig(solver="jump", steps=4, time_grid="edm"), "meanflow")


def test_meanflow_samples_in_jumps_and_nothing_else():
    from pipelines.batch.config import SampleConfig, validate_sample_config

    validate_sample_config(SampleConfig(solver="jump", steps=2), "meanflow")
    for solver in ("dopri5", "euler", "sde"):
        with pytest.raises(
            ConfigError,
            match=rf"sample.solver: '{solver}' is not allowed; meanflow models average "
            r"velocities: it samples in 'jump's \(sample.steps of them",
        ):
            validate_sample_config(SampleConfig(solver=solver), "meanflow")
    with pytest.raises(ConfigError, match=r"'jump' is MeanFlow's sampler \(and distill's\); otcfm gives a velocity"):
        validate_sample_config(SampleConfig(solver="jump"), "otcfm")
    # a distilled one-step map: one jump, nothing else
    validate_sample_config(SampleConfig(solver="jump", steps=1), "distill")
    with pytest.raises(
        ConfigError,
        match=r"^sample.steps: 2 is not allowed; distill is a one-step map fit at t = 0: it samples in one jump; "
        r"allowed: 1$",
    ):
        validate_sample_config(SampleConfig(solver="jump", steps=2), "distill")
    with pytest.raises(
        ConfigError,
        match=r"^sample.solver: 'euler' is not allowed; distill is a one-step map fit at t = 0: it samples in one "
        r"'jump' \(sample.steps=1\), not with an ODE or SDE solver$",
    ):
        validate_sample_config(SampleConfig(solver="euler", steps=1), "distill")
    # its model takes the interval's end, with smooth time features; other methods' models are as they were
    cfg = load_config("configs/digits-cpu.yaml", ["method.name=meanflow"])
    digits = DataSpec("digits", "image", [8, 8, 1])
    kwargs = model_kwargs(cfg, digits)
    assert kwargs["two_times"] is True and kwargs["time_scale"] == 1.0
    assert "two_times" not in model_kwargs(load_config("configs/digits-cpu.yaml", []), digits)
