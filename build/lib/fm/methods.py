"""Training methods: a path, a coupling and a prediction kind that together define what a model learns.

A method is built from registered parts: a path (`fm.paths.PATHS`), a coupling (`fm.couplings.COUPLINGS`) and a
prediction kind (`fm.paths.PREDICTIONS`; "epsilon" trains by denoising score matching, the others by CFM). The
named methods are presets of those parts in `METHODS`, the one place to add a method; config validation, the
comparison table's labels and the table below (`methods_markdown()`, checked against the README) all read it.

Every method but MeanFlow and one-step distillation gives a velocity field for ODE sampling and likelihood; the score
model through its probability-flow ODE. Three kinds share the interface (`pair`, `loss_on_pairs`, `loss`, `velocity`,
`draw_x0`):
- "euclidean" (`Method`): noise to data in R^D; `MeanFlowMethod` among them models the average velocity over an
  interval instead (`fm.meanflow`), sampled in jumps, and refuses ODE solvers and the likelihood; `DistillMethod`
  learns the one-step map of a flow's own pairs (sampled in one jump);
- "riemannian" (`RiemannianMethod`): the uniform prior to data on a manifold along geodesics (`fm.riemannian`);
  the data's manifold is a parameter (`manifold="sphere2"`);
- "snapshots" (`SnapshotMethod`): from the first to the last of unpaired snapshots at observed `times`, whose
  batches carry each row's snapshot index as its label (`fm.action_matching`): Action Matching, and CFM on the
  same snapshot pairs as its baseline.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from fm.action_matching import action_matching_loss, action_velocity, snapshot_cfm_loss, snapshot_pairs
from fm.couplings import COUPLINGS, Coupling, GivenCoupling, IndependentCoupling
from fm.likelihood import LikelihoodResult, LikelihoodSettings, log_likelihood
from fm.losses import UNIFORM, TimeSampling, cfm_loss, dsm_loss, sample_time
from fm.manifolds import Manifold, get_manifold
from fm.meanflow import MeanFlowSettings, average_velocity_fn, jump_sample, meanflow_loss, sample_interval
from fm.paths import PATHS, AffinePath, CondOTScheduler, NoisyLinearPath, VPScheduler
from fm.riemannian import MANIFOLD_SOLVERS, manifold_log_likelihood, manifold_ode_sample, rfm_loss
from fm.seeding import SeedStack
from fm.solvers import (
    FIXED_METHODS,
    SampleResult,
    VelocityFn,
    constant_diffusion,
    ode_sample,
    velocity_fn,
    vp_diffusion,
)

__all__ = [
    "METHODS",
    "MethodPreset",
    "MethodParams",
    "Method",
    "MeanFlowMethod",
    "DistillMethod",
    "RiemannianMethod",
    "SnapshotMethod",
    "FlowMethod",
    "make_method",
    "methods_markdown",
]

JUMP = "jump"  # the sampler of an average-velocity model (fm.meanflow.jump_sample): not an ODE solver

# sigma_1 = 0 on the VP path, where its velocity and score targets diverge: train and sample on t <= 1 - eps.
VP_T_MAX = 1.0 - 1e-5


@dataclass(frozen=True)
class MethodParams:
    """The parameters of the parts; each part reads the ones it needs (`PathSpec.params`, `CouplingSpec.args`).

    sigma: the straight-line paths' noise (`make_method` puts the preset's default for None: 0 for I-CFM and OT-CFM,
    1 for SB-CFM as in torchcfm).
    """

    sigma_min: float = 1e-4
    sigma: float = 0.0
    ot_scope: str = "local"
    beta_min: float = 0.1
    beta_max: float = 20.0


@dataclass(frozen=True)
class MethodPreset:
    """A named method: registered path and coupling names, what the model predicts, the last training time, the
    default sigma of a noisy straight-line path, and a one-line description for the docs."""

    path: str
    coupling: str
    prediction: str = "velocity"
    t_max: float = 1.0
    sigma: float = 0.0
    summary: str = ""
    kind: str = "euclidean"  # or "riemannian", "snapshots" (module docstring)
    one_step: bool = False  # the model is trained at t = 0 only, as the one-step map x_0 -> x_1 (`DistillMethod`)

    @property
    def needs_data(self) -> bool:
        """Whether building it needs the data's manifold or observed times (so only the data can check it)."""
        return self.kind != "euclidean"

    @property
    def velocity_field(self) -> bool:
        """Whether its model gives a velocity field (ODE solvers, the likelihood, straightness): all but MeanFlow's
        average velocity and the one-step map of distillation, which are sampled in jumps."""
        return self.prediction != "mean_velocity" and not self.one_step

    @property
    def two_times(self) -> bool:
        """Whether its model takes the interval's start r besides t (MeanFlow's average velocity u(x, t, r))."""
        return self.prediction == "mean_velocity"

    @property
    def fixed_step_solvers(self) -> tuple[str, ...]:
        """The fixed-step solvers its sampling takes: torchdiffeq's, on a manifold the projected ones, and for an
        average-velocity model its jumps."""
        if not self.velocity_field:
            return (JUMP,)
        return tuple(MANIFOLD_SOLVERS) if self.kind == "riemannian" else FIXED_METHODS


METHODS: dict[str, MethodPreset] = {
    "fm_ot": MethodPreset("ot", "independent", summary="Flow Matching on the OT path (Lipman et al. 2022)"),
    "fm_vp": MethodPreset("vp", "independent", t_max=VP_T_MAX, summary="Flow Matching on the VP diffusion path"),
    "score_vp": MethodPreset(
        "vp",
        "independent",
        "epsilon",
        VP_T_MAX,
        summary="denoising score matching on the VP SDE (the paper's baseline)",
    ),
    "icfm": MethodPreset("straight", "independent", summary="I-CFM (Tong et al. 2023)"),
    "otcfm": MethodPreset("straight", "exact_ot", summary="OT-CFM: minibatch exact OT pairs (Tong et al. 2023)"),
    "sbcfm": MethodPreset(
        "brownian",
        "entropic_ot",
        sigma=1.0,
        summary="SB-CFM: entropic OT (reg = 2 sigma^2) and a Brownian bridge (Tong et al. 2023)",
    ),
    "meanflow": MethodPreset(
        "straight",
        "independent",
        "mean_velocity",
        summary="MeanFlow: the average velocity over an interval, sampled in 1 to k jumps "
        "(`sample.solver=jump`; Geng et al. 2025)",
    ),
    "reflow": MethodPreset(
        "straight",
        "given",
        summary="Rectified Flow's reflow: straight paths between a trained flow's own pairs "
        "(x_0, x_1 = ODE(x_0)) from a `samples:DIR` source (Liu et al. 2022)",
    ),
    "distill": MethodPreset(
        "straight",
        "given",
        one_step=True,
        summary="one-step distillation of a (reflowed) flow: v(x_0, 0) regresses x_1 - x_0 on the flow's own pairs, "
        "sampled in one jump x_0 + v(x_0, 0) (Liu et al. 2022, Sec. 2.3)",
    ),
    "rfm": MethodPreset(
        "geodesic",
        "independent",
        kind="riemannian",
        summary="Riemannian FM on the data's manifold, uniform prior (Chen and Lipman 2023)",
    ),
    "am": MethodPreset(
        "snapshot_interpolant",
        "exact_ot",
        "action",
        kind="snapshots",
        summary="Action Matching from unpaired snapshots (Neklyudov et al. 2022)",
    ),
    "snapshot_icfm": MethodPreset(
        "snapshot_interpolant",
        "independent",
        kind="snapshots",
        summary="CFM on independent pairs of consecutive snapshots (AM's baseline)",
    ),
    "snapshot_otcfm": MethodPreset(
        "snapshot_interpolant",
        "exact_ot",
        kind="snapshots",
        summary="CFM on minibatch-OT pairs of consecutive snapshots",
    ),
}

# the paths of the other kinds, which the Euclidean registry `fm.paths.PATHS` does not build
OTHER_PATHS = {"geodesic": "geodesic (manifold)", "snapshot_interpolant": "snapshot interpolant"}


class FlowMethod(Protocol):
    """What training (`fm.training`), the Train worker and the batch actors use of a method, whatever its kind
    (module docstring): `Method` and `MeanFlowMethod` (Euclidean), `RiemannianMethod`, `SnapshotMethod`. Each
    member is documented here once; a kind that cannot do something (an SDE without a Gaussian path, noise for
    snapshots) raises ValueError saying why. Shapes: B rows of data of shape [...] (an image [C, H, W], a point
    [D])."""

    name: str  # the METHODS key
    coupling: Coupling  # pairs x_0 with x_1 (`fm.couplings`); its last_solve_seconds times a step's pairing

    @property
    def kind(self) -> str:
        """ "euclidean", "riemannian" or "snapshots"."""

    @property
    def prediction(self) -> str:
        """What the model outputs: "velocity", "epsilon", "mean_velocity" or "action" (`fm.paths.PREDICTIONS`)."""

    @property
    def draws_noise(self) -> bool:
        """Whether sampling starts from `draw_x0` (snapshot methods start from data of the first snapshot)."""

    @property
    def t_0(self) -> float:
        """The time sampling starts at."""

    @property
    def t_max(self) -> float:
        """The time sampling ends at (below 1 on the VP path, whose sigma_1 = 0)."""

    @property
    def t_limit(self) -> float | None:
        """The largest time the sampling field is defined at (`fm.solvers.ode_sample`), or None."""

    def draw_x0(self, seeds: SeedStack, shape: list[int] | tuple[int, ...]) -> Tensor:
        """Sampling's start [len(seeds), *shape], row k from seed k alone."""

    def pair(
        self, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A step's (x_0 [B, ...], x_1 [B, ...], y [B] or None), paired by the coupling, from `generator`."""

    def loss_on_pairs(
        self,
        model: nn.Module,
        x_0: Tensor,
        x_1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The per-sample loss [B] of paired rows; times and path noise from `generator`."""

    def loss(
        self, model: nn.Module, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """`pair`, then `loss_on_pairs`: the per-sample loss [B] for data x_1 [B, ...]."""

    def sample(
        self,
        fn: VelocityFn,
        x_0: Tensor,
        solver: str = "dopri5",
        steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        grid: str = "uniform",
    ) -> SampleResult:
        """From x_0 [B, ...] at t_0 to t_max along `fn` (`velocity`), with an ODE solver of `fm.solvers` (MeanFlow:
        in jumps), counting NFE; a fixed-step solver's steps fall on `grid` (`fm.solvers.time_grid`)."""

    def log_likelihood(
        self,
        fn: VelocityFn,
        x_1: Tensor,
        settings: LikelihoodSettings,
        generator: SeedStack | torch.Generator | None = None,
    ) -> LikelihoodResult:
        """log p_1(x_1) [B] by the change of variables in the method's space (`fm.likelihood`)."""

    def velocity(self, model: nn.Module, y: Tensor | None = None, cfg_scale: float = 1.0) -> VelocityFn:
        """The field a trained model gives for sampling (fn(t, x) -> [B, ...])."""

    @property
    def gaussian_path(self) -> AffinePath:
        """The Gaussian marginal path that converts the model to a score (SDE sampling); raises where none is."""

    def sde_diffusion(self, g: float) -> Callable[[Tensor], Tensor]:
        """The diffusion g(t) [B] -> [B] of the SDE this method may be sampled with (`Method.sde_diffusion`)."""


@dataclass
class Method:
    """A path, a coupling and the model's prediction kind, with the training loss and the sampling field."""

    name: str
    path: AffinePath | NoisyLinearPath
    coupling: Coupling
    prediction: str = "velocity"
    t_max: float = 1.0
    time_sampling: TimeSampling = UNIFORM  # the density of training times (`fm.losses.TimeSampling`)
    kind = "euclidean"
    t_0 = 0.0
    draws_noise = True  # sampling starts from `draw_x0` (snapshot methods start from data instead)

    def draw_x0(self, seeds: SeedStack, shape: list[int] | tuple[int, ...]) -> Tensor:
        """The starting points of sampling [len(seeds), *shape], row k from seed k alone: standard normal."""
        return seeds.randn(shape)

    def sample(
        self,
        fn: VelocityFn,
        x_0: Tensor,
        solver: str = "dopri5",
        steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        grid: str = "uniform",
    ) -> SampleResult:
        """Integrate the sampling ODE from x_0 [B, ...] at t_0 to t_max in the method's space, counting NFE."""
        return ode_sample(fn, x_0, solver, steps, atol, rtol, t_1=self.t_max, t_limit=self.t_limit, grid=grid)

    def log_likelihood(
        self,
        fn: VelocityFn,
        x_1: Tensor,
        settings: LikelihoodSettings,
        generator: SeedStack | torch.Generator | None = None,
    ) -> LikelihoodResult:
        """log p_1(x_1) [B] of points under the flow, by the change of variables of the method's space."""
        return log_likelihood(fn, x_1, settings, generator)

    def loss(
        self, model: nn.Module, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-sample training loss [B] for data x_1 [B, ...]; the noise, pairing, times and path noise all come
        from `generator`, so a step is repeated exactly from its seed."""
        return self.loss_on_pairs(model, *self.pair(x_1, y, generator), generator)

    def pair(
        self, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The first half of `loss`: noise x_0 [B, ...] drawn from `generator` and paired with x_1 (and its labels
        y) by the coupling. Can run ahead of the step (`fm.training.read_ahead`); `loss_on_pairs` then continues
        with the same generator."""
        if self.pairs_given:
            raise ValueError(
                f"method {self.name!r} trains on given pairs (x_0, x_1): its x_0 comes with each row of "
                "a pairs source (`samples:DIR`), not from fresh noise"
            )
        return self.coupling(self.noise(x_1, generator), x_1, y, generator)

    @property
    def pairs_given(self) -> bool:
        """Whether the method trains on pairs that come with the data (reflow) rather than drawing its noise."""
        return isinstance(self.coupling, GivenCoupling)

    def noise(self, x_1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A training step's noise x_0 ~ N(0, I) [B, ...] for data x_1 [B, ...], drawn from `generator`."""
        return torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)

    def loss_on_pairs(
        self,
        model: nn.Module,
        x_0: Tensor,
        x_1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The second half of `loss`: times, path sample and per-sample loss [B] for paired (x_0, x_1, y)."""
        t = sample_time(x_1.shape[0], self.t_max, generator, x_1.device, self.time_sampling).to(x_1.dtype)
        if self.prediction == "epsilon":  # the score model's path is VP's, an AffinePath (`METHODS`)
            return dsm_loss(model, self.gaussian_path, x_0, x_1, t, y)
        return cfm_loss(model, self.path.sample(x_0, x_1, t, generator), y)

    @property
    def gaussian_path(self) -> AffinePath:
        """The Gaussian path for score conversions (SDE sampling); I-CFM with sigma = 0 is the OT path."""
        if isinstance(self.path, AffinePath):
            return self.path
        if self.path.sigma == 0 and isinstance(self.coupling, IndependentCoupling):
            return AffinePath(CondOTScheduler(0.0))
        raise ValueError(
            f"method {self.name!r} has no Gaussian marginal path, so it has no score for SDE "
            "sampling; use an ODE solver"
        )

    def sde_diffusion(self, g: float) -> Callable[[Tensor], Tensor]:
        """The diffusion g(t) [B] -> [B] for `fm.solvers.sde_sample` that this method may be sampled with.

        g > 0: the constant g of the flow SDE, for any method with a Gaussian marginal path. g = 0: the reverse VP
        SDE's g(t) = sqrt(beta(1 - t)), for the VP path only. Raises ValueError saying what is allowed otherwise.
        """
        if g < 0:
            raise ValueError(f"the diffusion g must be >= 0; got {g}")
        path = self.gaussian_path  # raises for methods without a score
        if g > 0:
            return constant_diffusion(g)
        if isinstance(path.scheduler, VPScheduler):
            return vp_diffusion(path.scheduler)
        raise ValueError(
            f"g = 0 selects the reverse VP SDE, but method {self.name!r} is not on the VP path; "
            "give a constant diffusion g > 0"
        )

    @property
    def t_limit(self) -> float | None:
        """The largest time the sampling field is defined at (`fm.solvers.ode_sample`'s t_limit): t_max on the VP
        path, where sigma_1 = 0; None elsewhere."""
        return self.t_max if self.t_max < 1.0 else None

    def velocity(self, model: nn.Module, y: Tensor | None = None, cfg_scale: float = 1.0) -> VelocityFn:
        """The velocity field of a trained model (converted from epsilon for the score model)."""
        path = self.path if isinstance(self.path, AffinePath) else None
        return velocity_fn(model, y, cfg_scale, self.prediction, path)


@dataclass
class MeanFlowMethod(Method):
    """MeanFlow (`fm.meanflow`): a two-time model u(x, t, r) of the average velocity on the straight path between
    noise and data, trained with the MeanFlow identity and sampled in jumps (solver "jump", 1 step or more). Its
    model is not a velocity field, so ODE solvers, SDE sampling and the likelihood are refused in words."""

    settings: MeanFlowSettings = MeanFlowSettings()

    def loss_on_pairs(
        self,
        model: nn.Module,
        x_0: Tensor,
        x_1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Intervals (t, r) from `generator`, then the per-sample MeanFlow loss [B]."""
        t, r = sample_interval(x_1.shape[0], generator, x_1.device, self.settings)
        return meanflow_loss(model, x_0, x_1, t, r, y, self.settings)

    def sample(
        self,
        fn,
        x_0: Tensor,
        solver: str = JUMP,
        steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        grid: str = "uniform",
    ) -> SampleResult:
        """`steps` jumps (1 by default) of the average velocity from x_0 [B, ...] at t = 0 to t = 1, over `grid`."""
        if solver != JUMP:
            raise ValueError(
                f"method {self.name!r} samples in jumps of its average velocity (solver {JUMP!r} with "
                f"steps 1, 2, 4, ...); {solver!r} integrates a velocity field, which its model is not"
            )
        return jump_sample(fn, x_0, steps or 1, grid)

    def velocity(self, model: nn.Module, y: Tensor | None = None, cfg_scale: float = 1.0):
        """The average-velocity field u(x, t, r) of the two-time model (what `sample` takes)."""
        if cfg_scale != 1.0:
            raise ValueError(f"method {self.name!r} has no classifier-free guidance; cfg_scale must be 1")
        return average_velocity_fn(model, y)

    def log_likelihood(
        self, fn, x_1: Tensor, settings: LikelihoodSettings, generator: SeedStack | torch.Generator | None = None
    ) -> LikelihoodResult:
        raise ValueError(
            f"method {self.name!r} models average velocities over intervals, not a velocity field, so "
            "it has no change of variables to give a likelihood; evaluate its samples instead"
        )

    @property
    def gaussian_path(self) -> AffinePath:
        raise ValueError(
            f"method {self.name!r} models average velocities, not a score: it has no SDE sampling; use solver {JUMP!r}"
        )


@dataclass
class DistillMethod(Method):
    """One-step distillation (Liu et al. 2022, "Flow Straight and Fast", Sec. 2.3): on a flow's own pairs
    (x_0, x_1 = ODE(x_0)), the model at t = 0 regresses the whole displacement,

        min E || v(x_0, 0) - (x_1 - x_0) ||^2,

    which is the straight path's CFM loss with every t = 0 (x_t = x_0, dx_t = x_1 - x_0). Its sample is one jump,
    x_1 = x_0 + v(x_0, 0): one network call. The model is fit at t = 0 only, so it is no velocity field: ODE solvers,
    more than one jump, SDE sampling and the likelihood are refused in words."""

    def loss_on_pairs(
        self,
        model: nn.Module,
        x_0: Tensor,
        x_1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """|| v(x_0, 0) - (x_1 - x_0) ||^2 per sample [B] (no draw: every t is 0)."""
        t = torch.zeros(x_1.shape[0], device=x_1.device, dtype=x_1.dtype)
        return cfm_loss(model, self.path.sample(x_0, x_1, t, generator), y)

    def sample(
        self,
        fn,
        x_0: Tensor,
        solver: str = JUMP,
        steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        grid: str = "uniform",
    ) -> SampleResult:
        """The one jump x_0 + v(x_0, 0) [B, ...] from x_0 [B, ...] (NFE 1; one step is [0, 1] on every grid)."""
        if solver != JUMP or (steps or 1) != 1:
            raise ValueError(
                f"method {self.name!r} is a one-step map fit at t = 0: it samples in one {JUMP!r} (sample.steps=1); "
                f"{solver!r} with {steps} step(s) would evaluate it where it was never trained"
            )
        return ode_sample(fn, x_0, "euler", 1)  # x_0 + 1 * v(x_0, 0), one evaluation

    def log_likelihood(
        self, fn, x_1: Tensor, settings: LikelihoodSettings, generator: SeedStack | torch.Generator | None = None
    ) -> LikelihoodResult:
        raise ValueError(
            f"method {self.name!r} is a one-step map, not a velocity field, so it has no change of variables to give "
            "a likelihood; evaluate its samples instead"
        )

    @property
    def gaussian_path(self) -> AffinePath:
        raise ValueError(f"method {self.name!r} is a one-step map, not a score: it has no SDE sampling; use {JUMP!r}")


def _uniform_only(name: str, grid: str, why: str) -> None:
    """Refuse a time grid other than uniform for a method whose path is not a noise-to-data flow (`why`)."""
    if grid != "uniform":
        raise ValueError(f"method {name!r} samples on the uniform time grid only ({why}); got grid {grid!r}")


class _NonGaussianMethod(ABC):
    """The training loss of the kinds beyond `Method`, and their refusal of SDE sampling (no Gaussian path, so no
    score); a subclass says why in `_not_gaussian`."""

    name: str
    _not_gaussian: str

    @abstractmethod
    def pair(
        self, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """`FlowMethod.pair`."""

    @abstractmethod
    def loss_on_pairs(
        self,
        model: nn.Module,
        x_0: Tensor,
        x_1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`FlowMethod.loss_on_pairs`."""

    def loss(
        self, model: nn.Module, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-sample loss [B]: `pair`, then `loss_on_pairs`, as `Method.loss`."""
        return self.loss_on_pairs(model, *self.pair(x_1, y, generator), generator)

    @property
    def gaussian_path(self):
        raise ValueError(
            f"method {self.name!r} {self._not_gaussian}: it has no Gaussian path for SDE sampling; use an ODE solver"
        )

    def sde_diffusion(self, g: float):
        return self.gaussian_path  # raises


class RiemannianMethod(_NonGaussianMethod):
    """Riemannian Flow Matching on a manifold (`fm.riemannian`): x_0 from the uniform prior, the geodesic path, a
    model whose output is a tangent field (`fm.models.MLP` with `manifold=`)."""

    kind = "riemannian"
    prediction = "velocity"
    draws_noise = True  # from the uniform prior on the manifold
    t_0, t_max, t_limit = 0.0, 1.0, None

    def __init__(self, name: str, manifold: Manifold, coupling: Coupling):
        self.name, self.manifold, self.coupling = name, manifold, coupling
        self._not_gaussian = f"lives on {manifold.label}"

    def draw_x0(self, seeds: SeedStack, shape: list[int] | tuple[int, ...]) -> Tensor:
        """Uniform points on the manifold [len(seeds), D], row k from seed k alone."""
        return torch.cat([self.manifold.random_uniform(1, g) for g in seeds.generators]).to(seeds.device)

    def sample(
        self,
        fn: VelocityFn,
        x_0: Tensor,
        solver: str = "dopri5",
        steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        grid: str = "uniform",
    ) -> SampleResult:
        """Integrate the tangent field on the manifold (projected steps), counting NFE."""
        _uniform_only(self.name, grid, "a manifold has no noise-to-signal ratio to place its steps by")
        return manifold_ode_sample(fn, self.manifold, x_0, solver, steps, atol, rtol)

    def log_likelihood(
        self,
        fn: VelocityFn,
        x_1: Tensor,
        settings: LikelihoodSettings,
        generator: SeedStack | torch.Generator | None = None,
    ) -> LikelihoodResult:
        """log p_1(x_1) [B] on the manifold: the Riemannian change of variables from the uniform prior."""
        return manifold_log_likelihood(fn, self.manifold, x_1, settings, generator)

    def pair(
        self, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        x_0 = self.manifold.random_uniform(x_1.shape[0], generator, x_1.dtype, x_1.device)
        return self.coupling(x_0, self.manifold.projx(x_1), y, generator)

    def loss_on_pairs(
        self,
        model: nn.Module,
        x_0: Tensor,
        x_1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return rfm_loss(model, self.manifold, x_0, x_1, y, generator)

    def velocity(self, model: nn.Module, y: Tensor | None = None, cfg_scale: float = 1.0) -> VelocityFn:
        return velocity_fn(model, y, cfg_scale)


class SnapshotMethod(_NonGaussianMethod):
    """Action Matching, or CFM, from unpaired snapshots at observed `times` (`fm.action_matching`). A batch holds
    rows of every snapshot with the snapshot index as label; the coupling pairs consecutive snapshots."""

    kind = "snapshots"
    t_limit = None
    draws_noise = False  # it carries the first snapshot's rows through the observed times (`fm.action_matching`)

    def __init__(self, name: str, times: list[float], coupling: Coupling, prediction: str):
        if len(times) < 2 or any(b <= a for a, b in zip(times[:-1], times[1:], strict=True)):
            raise ValueError(f"{name} needs at least two increasing observation times; got {times}")
        self.name, self.coupling, self.prediction = name, coupling, prediction
        self.times = torch.tensor([float(t) for t in times])
        self.t_0, self.t_max = float(times[0]), float(times[-1])

    def draw_x0(self, seeds: SeedStack, shape: list[int] | tuple[int, ...]) -> Tensor:
        raise ValueError(f"method {self.name!r} starts from data of the first snapshot, not from noise")

    def sample(
        self,
        fn: VelocityFn,
        x_0: Tensor,
        solver: str = "dopri5",
        steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        grid: str = "uniform",
    ) -> SampleResult:
        """Carry x_0 [B, D], rows of the first snapshot, from t_0 to the last observed time t_max, counting NFE (every
        observed time on the way: `fm.action_matching.transport`)."""
        _uniform_only(self.name, grid, "its path runs between data snapshots, not from noise")
        return ode_sample(fn, x_0, solver, steps, atol, rtol, t_0=self.t_0, t_1=self.t_max)

    def log_likelihood(
        self,
        fn: VelocityFn,
        x_1: Tensor,
        settings: LikelihoodSettings,
        generator: SeedStack | torch.Generator | None = None,
    ) -> LikelihoodResult:
        raise ValueError(
            f"method {self.name!r} moves data between snapshots from no prior density, so it has no "
            "likelihood; its evaluation is the distance to each held-out snapshot"
        )

    def pair(
        self, x_1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, segment): rows of consecutive snapshots paired; y holds every row's snapshot index."""
        if y is None:
            raise ValueError(f"method {self.name!r} needs each row's snapshot index as its label")
        start = time.perf_counter()
        out = snapshot_pairs(x_1, y, len(self.times), generator, self.coupling)
        self.coupling.last_solve_seconds = time.perf_counter() - start
        return out

    def loss_on_pairs(
        self,
        model: nn.Module,
        x_0: Tensor,
        x_1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if y is None:
            raise ValueError(f"method {self.name!r} needs the pairs' segment index (`pair`'s third value) as y")
        loss = action_matching_loss if self.prediction == "action" else snapshot_cfm_loss
        return loss(model, x_0, x_1, y, self.times, generator)

    def velocity(self, model: nn.Module, y: Tensor | None = None, cfg_scale: float = 1.0) -> VelocityFn:
        """grad_x s for an action, the model itself for a velocity model."""
        return action_velocity(model) if self.prediction == "action" else velocity_fn(model)

    _not_gaussian = "moves data between snapshots"


def make_method(
    name: str,
    sigma_min: float = 1e-4,
    sigma: float | None = None,
    ot_scope: str = "local",
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    manifold: str | None = None,
    times: list[float] | None = None,
    time_sampling: str = "uniform",
    time_loc: float = 0.0,
    time_scale: float = 1.0,
    meanflow_ratio: float = 0.25,
    meanflow_p: float = 1.0,
) -> FlowMethod:
    """Build a method preset by name from its registered parts.

    Args:
        name: a key of METHODS.
        sigma_min: the OT path's end-point std (fm_ot).
        sigma: noise of the straight-line paths (icfm, otcfm, sbcfm); None takes the preset's default.
        ot_scope: "local" (solve per worker batch) or "global" (one plan over all ranks) for exact OT couplings.
        beta_min, beta_max: the VP schedule (fm_vp, score_vp).
        manifold: the data's manifold ("sphere2", "torus2"); required by, and only allowed for, riemannian methods.
        times: the snapshots' observation times; required by, and only allowed for, snapshot methods.
        time_sampling, time_loc, time_scale: the density of training times (`fm.losses.TimeSampling`: "uniform",
            or "logit_normal" with its loc and scale); Euclidean methods only.
        meanflow_ratio, meanflow_p: MeanFlow's fraction of intervals with r != t and its adaptive loss weight's
            power (`fm.meanflow.MeanFlowSettings`).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    if ot_scope not in ("local", "global"):
        raise ValueError(f"unknown ot_scope {ot_scope!r}; allowed: local, global")
    preset = METHODS[name]
    times_drawn = TimeSampling(time_sampling, time_loc, time_scale)
    if times_drawn != UNIFORM and preset.kind != "euclidean":
        raise ValueError(
            f"time sampling {time_sampling!r} is for Euclidean methods; {name!r} is {preset.kind} and draws t uniformly"
        )
    if (manifold is not None) != (preset.kind == "riemannian"):
        raise ValueError(
            f"method {name!r} needs data on a manifold (allowed: rfm)"
            if manifold is None
            else f"data on the manifold {manifold!r} need a Riemannian method (rfm); {name!r} is {preset.kind}"
        )
    if (times is not None) != (preset.kind == "snapshots"):
        snapshot_methods = ", ".join(k for k, p in METHODS.items() if p.kind == "snapshots")
        raise ValueError(
            f"method {name!r} needs snapshot data with observation times"
            if times is None
            else f"snapshot data need a snapshot method ({snapshot_methods}); {name!r} is {preset.kind}"
        )
    if preset.kind == "riemannian" and manifold is not None:  # (checked above: a Riemannian method has one)
        return RiemannianMethod(name, get_manifold(manifold), COUPLINGS[preset.coupling].cls())
    if preset.kind == "snapshots" and times is not None:  # (checked above: a snapshot method has them)
        return SnapshotMethod(name, list(times), COUPLINGS[preset.coupling].cls(), preset.prediction)
    params = MethodParams(sigma_min, preset.sigma if sigma is None else sigma, ot_scope, beta_min, beta_max)
    if preset.coupling == "entropic_ot" and params.sigma <= 0:
        raise ValueError(f"{name} needs sigma > 0 (entropic regularisation 2 sigma^2); got sigma={params.sigma}")
    path_spec = PATHS[preset.path]
    path = path_spec.build(**{k: getattr(params, k) for k in path_spec.params})
    coupling_spec = COUPLINGS[coupling_name(name, ot_scope)]
    if preset.one_step:
        if times_drawn != UNIFORM:
            raise ValueError(f"method {name!r} trains at t = 0 only: it draws no times (time sampling: uniform)")
        return DistillMethod(name, path, coupling_spec.cls(**coupling_spec.args(params)), preset.prediction)
    if not preset.velocity_field:
        return MeanFlowMethod(
            name,
            path,
            coupling_spec.cls(**coupling_spec.args(params)),
            preset.prediction,
            preset.t_max,
            times_drawn,
            MeanFlowSettings(meanflow_ratio, times_drawn, meanflow_p),
        )
    return Method(
        name, path, coupling_spec.cls(**coupling_spec.args(params)), preset.prediction, preset.t_max, times_drawn
    )


def coupling_name(method: str, ot_scope: str = "local") -> str:
    """The registered coupling a method uses: exact OT becomes the global-batch plan when ot_scope is global (for
    Euclidean methods; the others pair within a worker's batch whatever the scope)."""
    preset = METHODS[method]
    global_plan = preset.coupling == "exact_ot" and ot_scope == "global" and preset.kind == "euclidean"
    return "global_ot" if global_plan else preset.coupling


def describe(method: str, ot_scope: str = "local") -> tuple[str, str]:
    """(path label, coupling label) of a method, as the comparison table shows them; ("?", "?") if unknown."""
    if method not in METHODS:
        return "?", "?"
    path = METHODS[method].path
    label = OTHER_PATHS[path] if path in OTHER_PATHS else PATHS[path].label
    return label, COUPLINGS[coupling_name(method, ot_scope)].label


def methods_markdown() -> str:
    """The registry as a markdown table (the README's list of methods)."""
    lines = [
        "| method | path | coupling | model predicts | loss | default sigma | what it is |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, p in METHODS.items():
        path, coupling = describe(name)
        loss = {"epsilon": "DSM", "action": "AM", "mean_velocity": "MeanFlow"}.get(
            p.prediction, "RFM" if p.kind == "riemannian" else "CFM"
        )
        sigma = str(p.sigma) if p.path in PATHS and "sigma" in PATHS[p.path].params else "–"
        lines.append(f"| `{name}` | {path} | {coupling} | {p.prediction} | {loss} | {sigma} | {p.summary} |")
    return "\n".join(lines)
