"""The batch stages' `nice`: an actor lowers its own OS priority, and quality while training scores below its
trainers (the time it saves the trainers is measured in BENCHMARKS.md, not here)."""

import subprocess
import sys

import pytest

from pipelines.batch.config import EvalConfig, SampleConfig, validate_eval_config, validate_sample_config
from pipelines.core.errors import ConfigError


def test_an_actor_lowers_its_own_priority_by_nice_and_keeps_its_threads():
    # twice: a pooled worker that runs one task at `nice` after another stays `nice` above where it started
    code = (
        "import os, torch; from pipelines.core.runtime import use_cpu_share; base = os.nice(0); "
        "use_cpu_share(1.0, 7); threads = use_cpu_share(1.0, 7); "
        "print(os.nice(0) - base, threads, torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["7", "1", "1"]


def test_a_lowered_priority_keeps_to_ray_workers_of_its_own(ray_local):
    """A task at a lowered priority (`nice_args`, as the scoring stages of quality while training run) runs on Ray
    workers of that priority only: at `nice` above a plain worker's niceness however many such tasks a worker ran,
    and no plain task ever runs on one of them afterwards."""
    import os

    import ray

    from pipelines.core.runtime import nice_args, use_cpu_share

    @ray.remote(num_cpus=0.5)
    def niceness(nice: int) -> tuple[int, int]:
        use_cpu_share(0.5, nice)
        return os.getpid(), os.nice(0)

    (_, base), *_ = ray.get([niceness.remote(0) for _ in range(2)])
    low = [ray.get(niceness.options(**nice_args(3)).remote(3)) for _ in range(3)]
    assert {n for _, n in low} == {min(19, base + 3)}, (base, low)
    plain = ray.get([niceness.remote(0) for _ in range(4)])
    assert {n for _, n in plain} == {base}, (base, plain)
    assert not {p for p, _ in low} & {p for p, _ in plain}, (low, plain)


def test_nice_is_checked_and_quality_while_training_scores_at_the_lowest_priority():
    from pipelines.chain import quality_configs
    from pipelines.train.config import load_config

    with pytest.raises(ConfigError, match=r"^sample.nice: 20 is not allowed; must be in \[0, 19\]"):
        validate_sample_config(SampleConfig(nice=20))
    with pytest.raises(ConfigError, match=r"^eval.nice: -1 is not allowed; must be in \[0, 19\]"):
        validate_eval_config(EvalConfig(nice=-1))
    scfg, ecfg = quality_configs(load_config("configs/digits-cpu.yaml", ["train.eval_every=200"]))
    assert scfg.nice == ecfg.nice == 19  # the default: the lowest priority
    scfg, ecfg = quality_configs(load_config("configs/digits-cpu.yaml", ["train.eval_nice=0"]))
    assert scfg.nice == ecfg.nice == 0
    with pytest.raises(ConfigError, match=r"^train.eval_nice: 20 is not allowed; must be in \[0, 19\]"):
        load_config("configs/digits-cpu.yaml", ["train.eval_nice=20"])


def test_the_straightness_task_runs_at_a_lowered_priority_with_the_same_figures(tmp_path, ray_local, digits):
    """The straightness runs as a Ray task; at eval.nice > 0 on workers of that priority only (`nice_args`), so that
    no plain task inherits a lowered priority. Its figures do not depend on the priority."""
    from pipeline_helpers import make_checkpoint

    from pipelines.batch.evaluate import straightness_stage
    from pipelines.core.manifest import Manifest

    ckpt, manifest = str(make_checkpoint(tmp_path / "ckpt")), Manifest.load(digits)
    low = straightness_stage(ckpt, manifest, EvalConfig(nice=5, straightness_samples=4, straightness_steps=2))
    same = straightness_stage(ckpt, manifest, EvalConfig(straightness_samples=4, straightness_steps=2))
    assert low.samples == 4 and low.straightness == same.straightness


def test_a_node_label_is_checked_and_reaches_the_scorer_and_its_stages():
    from pipelines.chain import quality_configs
    from pipelines.core.runtime import resource_args
    from pipelines.train.config import load_config

    for key, check in (("sample.resource", validate_sample_config), ("eval.resource", validate_eval_config)):
        cls = SampleConfig if key.startswith("sample") else EvalConfig
        with pytest.raises(ConfigError, match=rf"^{key}: 'GPU' is not allowed; must be empty \(any node\) or a custom"):
            check(cls(resource="GPU"))
    with pytest.raises(ConfigError, match=r"^train.eval_resource: 'two words' is not allowed; must be empty"):
        load_config("configs/digits-cpu.yaml", ["train.eval_resource=two words"])
    scfg, ecfg = quality_configs(load_config("configs/digits-cpu.yaml", ["train.eval_resource=scoring"]))
    assert scfg.resource == ecfg.resource == "scoring"
    assert resource_args("scoring") == {"resources": {"scoring": 0.001}} and resource_args("") == {}


def test_a_label_no_node_carries_is_refused_before_work_on_the_running_ray(tmp_path, ray_local):
    """A custom resource that no node has would leave its actors waiting for ever: the stage refuses it at once."""
    from pipeline_helpers import make_checkpoint

    from pipelines.batch.sample import run_sampling

    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(
        ConfigError,
        match=r"^sample.actors=1, sample.cpus_per_actor=0.5, sample.gpus_per_actor=0, sample.resource=scoring: each "
        r"actor asks for .*scoring.*, which no node of this Ray's 1 node\(s\)",
    ):
        run_sampling(ckpt, tmp_path / "out", SampleConfig(num_samples=8, actors=1, resource="scoring"))


@pytest.mark.parametrize(
    "label, message",
    [
        ("train.eval_resource=scoring", r"^train.eval_resource=scoring: each scorer asks for .*scoring.*, which no"),
        (
            "ray.worker_resource=trainers",
            r"^ray.num_workers=2, ray.cpus_per_worker=0.5, ray.use_gpu=False, ray.worker_resource=trainers: each "
            r"Train worker asks for .*trainers.*, which no node of .* has",
        ),
    ],
)
def test_training_refuses_a_label_no_node_carries_before_ray_starts(digits, tmp_path, label, message):
    import ray

    from pipelines.train.config import load_config
    from pipelines.train.driver import run_training

    cfg = load_config(
        "configs/digits-cpu.yaml",
        [
            f"data.shards={digits}",
            f"train.storage_path={tmp_path}",
            "train.eval_every=200",
            label,
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
        ],
    )
    started = ray.is_initialized()
    with pytest.raises(ConfigError, match=message):
        run_training(cfg)
    assert ray.is_initialized() == started  # refused before Ray was started or joined
