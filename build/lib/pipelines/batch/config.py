"""The batch stages' sections: `sample.*` (jobs.sample) and `eval.*` (jobs.evaluate), with their checks."""

from __future__ import annotations

from dataclasses import dataclass

from fm.methods import JUMP, METHODS, make_method
from fm.solvers import ADAPTIVE_METHODS, FIXED_METHODS, GRIDS, check_solver
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PRECISIONS, check, check_resource_name

SOLVERS = ADAPTIVE_METHODS + FIXED_METHODS + ("sde", JUMP)
# the keys of both sections that place a stage's work, not what it computes: a rerun or resume may change them
SCHEDULING = ("actors", "blocks_per_call", "cpus_per_actor", "gpus_per_actor", "nice", "resource")


@dataclass
class SampleConfig:
    num_samples: int = 1000
    solver: str = "dopri5"  # any torchdiffeq method, "sde" (Euler–Maruyama), or "jump" (meanflow, `steps` jumps)
    atol: float = 1e-5
    rtol: float = 1e-5
    steps: int = 100  # fixed-step methods and sde
    # where a fixed-step solver's (or MeanFlow's jumps') steps fall: uniform, or edm (EDM's rho = 7 noise levels,
    # `fm.solvers.time_grid`)
    time_grid: str = "uniform"
    sde_g: float = 0.0  # diffusion of the flow SDE; 0 means the VP reverse SDE's g(t) = sqrt(beta) (VP methods)
    cfg_scale: float = 1.0
    label: int = -1  # class for conditional models; -1 cycles through the classes by id
    seed: int = 0
    block_size: int = 64
    blocks_per_call: int = 1  # Ray batch size, in blocks
    actors: int = 0  # 0: as many as the cluster's cores (or GPUs) and memory hold (`pipelines.core.runtime.actor_pool`)
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    # added to the OS niceness of the stage's actors (0 to 19): they yield their cores to processes of a higher
    # priority where they share a node (quality while training scores at 19, below its trainers)
    nice: int = 0
    # a node label (a Ray custom resource, `ray start --resources='{"NAME": 1}'`) that the stage's actors need: they
    # run only on nodes that carry it (quality while training keeps its scorer off the trainers' nodes so). "": any
    resource: str = ""
    write_png: bool = False
    fail_at_block: int = -1  # test hook: the actor raises once when it reaches this block
    # the network's evaluations under autocast: fp32 | bf16 | fp16 (GPU actors only); the ODE state stays fp32
    precision: str = "fp32"


def _check_precision(section: str, precision: str, gpus_per_actor: float) -> None:
    """A batch stage's autocast setting: fp32, bf16, or fp16 on GPU actors only."""
    check(precision in PRECISIONS[1:], f"{section}.precision", precision, f"allowed: {', '.join(PRECISIONS[1:])}")
    check(
        precision != "fp16" or gpus_per_actor > 0,
        f"{section}.precision",
        precision,
        f"fp16 needs GPU actors ({section}.gpus_per_actor > 0); use fp32 or bf16 on CPU",
    )


def validate_sample_config(c: SampleConfig, method: str | None = None, method_kwargs: dict | None = None) -> None:
    """Check every sample.* value; with the checkpoint's method, also that the solver suits it."""
    check(c.num_samples >= 1, "sample.num_samples", c.num_samples, "must be >= 1")
    check(c.solver in SOLVERS, "sample.solver", c.solver, f"allowed: {', '.join(SOLVERS)}")
    check(c.atol > 0 and c.rtol > 0, "sample.atol/rtol", (c.atol, c.rtol), "must be > 0")
    check(c.steps >= 1, "sample.steps", c.steps, "must be >= 1")
    check(c.time_grid in GRIDS, "sample.time_grid", c.time_grid, f"allowed: {', '.join(GRIDS)}")
    check(
        c.time_grid == "uniform" or c.solver in (*FIXED_METHODS, JUMP),
        "sample.time_grid",
        c.time_grid,
        f"places fixed steps; sample.solver={c.solver} "
        + ("steps uniformly in its own scheme" if c.solver == "sde" else "chooses its own")
        + ": use uniform",
    )
    check(c.sde_g >= 0, "sample.sde_g", c.sde_g, "must be >= 0")
    check(c.block_size >= 1, "sample.block_size", c.block_size, "must be >= 1")
    check(c.blocks_per_call >= 1, "sample.blocks_per_call", c.blocks_per_call, "must be >= 1")
    check(c.actors >= 0, "sample.actors", c.actors, "must be >= 1, or 0 for as many as the cluster holds")
    check(c.cpus_per_actor > 0, "sample.cpus_per_actor", c.cpus_per_actor, "must be > 0")
    check(c.gpus_per_actor >= 0, "sample.gpus_per_actor", c.gpus_per_actor, "must be >= 0")
    check(0 <= c.nice <= 19, "sample.nice", c.nice, "must be in [0, 19] (added to the actors' OS niceness)")
    check_resource_name(c.resource, "sample.resource")
    _check_precision("sample", c.precision, c.gpus_per_actor)
    if method in METHODS:
        field = METHODS[method].velocity_field
        check(
            (c.solver == JUMP) != field,
            "sample.solver",
            c.solver,
            f"{method} models average velocities: it samples in {JUMP!r}s (sample.steps of them: 1, 2, 4, ...), "
            "not with an ODE or SDE solver"
            if METHODS[method].two_times
            else f"{method} is a one-step map fit at t = 0: it samples in one {JUMP!r} (sample.steps=1), not with an "
            "ODE or SDE solver"
            if not field
            else f"{JUMP!r} is MeanFlow's sampler (and distill's); {method} gives a velocity field: use an ODE solver "
            "or sde",
        )
        check(
            not METHODS[method].one_step or c.steps == 1,
            "sample.steps",
            c.steps,
            f"{method} is a one-step map fit at t = 0: it samples in one jump; allowed: 1",
        )
        check(
            c.time_grid == "uniform" or METHODS[method].kind == "euclidean",
            "sample.time_grid",
            c.time_grid,
            f"{method} is a {METHODS[method].kind} method, whose path is not a flow from noise to data: use uniform",
        )
    if method in METHODS and c.solver in FIXED_METHODS:
        allowed = METHODS[method].fixed_step_solvers
        check(
            c.solver in allowed,
            "sample.solver",
            c.solver,
            f"a fixed-step solver on a manifold must be one of {', '.join(allowed)} (or use an adaptive one)",
        )
    if c.solver == "sde" and method is not None:
        try:
            make_method(**(method_kwargs or {"name": method})).sde_diffusion(c.sde_g)
        except ValueError as err:
            raise ConfigError(
                f"sample.sde_g: {c.sde_g!r} is not allowed with sample.solver=sde for this {method} checkpoint: {err}"
            ) from None


@dataclass
class EvalConfig:
    split: str = "test"
    max_images: int = 0  # 0: the whole split
    draws: int = 1  # K dequantization draws
    divergence: str = "hutchinson"  # or "exact"
    probes: int = 1  # H Hutchinson probes
    probe_kind: str = "rademacher"  # or "gaussian"
    solver: str = "dopri5"  # the likelihood ODE: any torchdiffeq method
    steps: int | None = None  # fixed-step solvers only
    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 64  # the likelihood's fixed blocks: rows solved together (an adaptive solver shares its steps)
    blocks_per_call: int = 1  # Ray batch size, in blocks (changes nothing but scheduling)
    actors: int = 0  # 0: as many as the cluster's cores (or GPUs) and memory hold (`pipelines.core.runtime.actor_pool`)
    cpus_per_actor: float = 0.5
    seed: int = 0
    classifier_epochs: int = 15
    features: str = "auto"  # inception (FID), classifier, or auto: inception from 16x16 up, else the classifier
    reference_split: str = "train"  # FID/FD against this split (the papers' convention)
    reference_max: int = 0  # 0: the whole reference split; else about this many of its images (by id hash)
    floor_split: str = "test"  # held-out real images scored against the reference: the floor ("": none)
    subset_size: int = 2000  # features kept for KID and precision/recall
    feature_batch: int = 64
    gpus_per_actor: float = 0.0
    nice: int = 0  # added to the OS niceness of the stages' actors (0 to 19; `sample.nice`)
    resource: str = ""  # a node label the stages' actors need (`sample.resource`); "": any node
    straightness_samples: int = 64  # trajectories whose straightness is measured (fm.straightness); 0: none
    straightness_steps: int = 16  # their RK4 steps
    # the likelihood's network evaluations under autocast: fp32 | bf16 | fp16 (GPU actors only). The ODE state, the
    # probes and the log-density integral stay fp32; the divergence is the vector-Jacobian product of that same
    # autocast forward (an fp32 divergence would need an fp32 forward, which is what fp32 is)
    precision: str = "fp32"


FEATURES = ("auto", "inception", "classifier")


def validate_eval_config(c: EvalConfig) -> None:
    """Check every eval.* value, solver settings included, before any Ray work."""
    check(c.draws >= 1, "eval.draws", c.draws, "must be >= 1")
    check(c.divergence in ("exact", "hutchinson"), "eval.divergence", c.divergence, "allowed: exact, hutchinson")
    check(c.probes >= 1, "eval.probes", c.probes, "must be >= 1")
    check(
        c.draws == 1 or c.divergence == "exact",
        "eval.draws",
        c.draws,
        "K > 1 dequantization draws need eval.divergence=exact (Hutchinson estimates make their "
        "log-mean-exp biased low)",
    )
    check(c.probe_kind in ("rademacher", "gaussian"), "eval.probe_kind", c.probe_kind, "allowed: rademacher, gaussian")
    check(c.batch_size >= 1, "eval.batch_size", c.batch_size, "must be >= 1")
    check(c.blocks_per_call >= 1, "eval.blocks_per_call", c.blocks_per_call, "must be >= 1")
    check(c.actors >= 0, "eval.actors", c.actors, "must be >= 1, or 0 for as many as the cluster holds")
    check(c.cpus_per_actor > 0, "eval.cpus_per_actor", c.cpus_per_actor, "must be > 0")
    check(0 <= c.nice <= 19, "eval.nice", c.nice, "must be in [0, 19] (added to the actors' OS niceness)")
    check_resource_name(c.resource, "eval.resource")
    check(c.max_images >= 0, "eval.max_images", c.max_images, "must be >= 0")
    check(c.classifier_epochs >= 1, "eval.classifier_epochs", c.classifier_epochs, "must be >= 1")
    check(c.features in FEATURES, "eval.features", c.features, f"allowed: {', '.join(FEATURES)}")
    check(
        c.reference_max == 0 or c.reference_max >= 10,
        "eval.reference_max",
        c.reference_max,
        "must be 0 (the whole split) or >= 10",
    )
    check(c.subset_size >= 10, "eval.subset_size", c.subset_size, "must be >= 10")
    check(c.feature_batch >= 1, "eval.feature_batch", c.feature_batch, "must be >= 1")
    check(c.gpus_per_actor >= 0, "eval.gpus_per_actor", c.gpus_per_actor, "must be >= 0")
    check(c.straightness_samples >= 0, "eval.straightness_samples", c.straightness_samples, "must be >= 0 (0: none)")
    check(c.straightness_steps >= 1, "eval.straightness_steps", c.straightness_steps, "must be >= 1")
    _check_precision("eval", c.precision, c.gpus_per_actor)
    try:
        check_solver(c.solver, c.steps, c.atol, c.rtol)
    except ValueError as err:
        key = "eval.steps" if "steps" in str(err) else "eval.atol/rtol" if "atol" in str(err) else "eval.solver"
        raise ConfigError(f"{key}: {err}") from None
