"""Moving averages of model parameters: the EMA of training (`EMA`), and EDM2's power-function EMAs whose
snapshots give any EMA length after training (`PowerEMA`, `posthoc_coefficients`, `combine_states`)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """Keeps ema = decay * ema + (1 - decay) * param after each `update`; buffers are copied.

    With warmup, the decay used at update n is min(decay, (1 + n) / (10 + n)), so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params: list[Tensor] = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


# --- Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
# EDM2, Sec. 3 and App. C). A power-function EMA with exponent gamma averages the weights theta(tau) of the run so
# far, t steps, with the profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. Its length is given as
# sigma_rel, the profile's standard deviation relative to t, which does not depend on t. Snapshots of a few such
# averages, taken during training, are combined afterwards into the average of any other profile: the least-squares
# fit of the wanted profile by the snapshots' profiles in L2(tau).


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has the relative standard deviation sigma_rel (EDM2, Eq. 3 inverted).

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) is a cubic in gamma; its largest real root is the
    answer. sigma_rel must be in (0, SIGMA_REL_MAX): SIGMA_REL_MAX is gamma = 0's, the flat average of all steps.
    """
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (the flat average of every step); got {sigma_rel}"
        )
    s = sigma_rel**-2
    roots = torch.linalg.eigvals(
        torch.tensor([[-7.0, s - 16.0, s - 12.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    )  # the companion matrix's eigenvalues
    return float(roots.real[roots.imag.abs() < 1e-9].max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent gamma > -1 (EDM2, Eq. 3)."""
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


SIGMA_REL_MAX = gamma_to_sigma_rel(0.0)  # = 1 / sqrt(12)


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per sigma_rel, for post-hoc EMA.

    After n updates, profile k holds sum_{i<n} w_i theta_i with w_i = ((i + 1)^(g + 1) - i^(g + 1)) / n^(g + 1)
    (g = gamma_k), the exact integral of the profile over step i: update n uses beta_n = (1 - 1/n)^(g + 1), so the
    first update copies the weights and the run's start is never mixed with a random initial average. Buffers are
    copied, as by `EMA`.
    """

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...] | list[float]):
        if not sigma_rels:
            raise ValueError("PowerEMA needs at least one sigma_rel")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.modules = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = self.num_updates
        params = [p.detach() for p in model.parameters()]
        for gamma, module in zip(self.gammas, self.modules, strict=True):
            beta = (1.0 - 1.0 / n) ** (gamma + 1.0)
            torch._foreach_lerp_(list(module.parameters()), params, 1.0 - beta)
            for b_ema, b in zip(module.buffers(), model.buffers(), strict=True):
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {
            "sigma_rels": list(self.sigma_rels),
            "num_updates": self.num_updates,
            "modules": [m.state_dict() for m in self.modules],
        }

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != list(self.sigma_rels):
            raise ValueError(
                f"the saved power EMAs have sigma_rel {state['sigma_rels']}, this run {list(self.sigma_rels)}"
            )
        for module, saved in zip(self.modules, state["modules"], strict=True):
            module.load_state_dict(saved)
        self.num_updates = int(state["num_updates"])


def profile_inner(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for power-function profiles (lengths t, exponents gamma;
    broadcast shapes). In logs, since t^gamma overflows for long runs and narrow profiles."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    g = gamma_a + gamma_b + 1.0
    log = (
        torch.log(gamma_a + 1)
        + torch.log(gamma_b + 1)
        - torch.log(g)
        + g * torch.log(torch.minimum(t_a, t_b))
        - (gamma_a + 1) * torch.log(t_a)
        - (gamma_b + 1) * torch.log(t_b)
    )
    return torch.exp(log)


def posthoc_coefficients(t: Tensor, gamma: Tensor, t_target: float, gamma_target: float) -> Tensor:
    """Weights x [S] of S snapshots (their steps t [S] and exponents gamma [S]) whose sum of profiles is closest
    in L2 to the target profile (length t_target, exponent gamma_target): the normal equations A x = b with
    A_ij = <p_i, p_j>, b_i = <p_i, p_target> (EDM2, App. C.3), solved by least squares in float64. A target
    equal to one snapshot's profile gives that snapshot alone."""
    t, gamma = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(gamma, dtype=torch.float64)
    if t.ndim != 1 or t.shape != gamma.shape or len(t) == 0:
        raise ValueError(
            f"expected steps and exponents of the same length >= 1; got {tuple(t.shape)} and {tuple(gamma.shape)}"
        )
    if bool((t <= 0).any()) or t_target <= 0:
        raise ValueError("snapshot and target steps must be positive")
    a = profile_inner(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    b = profile_inner(t, gamma, torch.tensor(float(t_target)), torch.tensor(float(gamma_target)))
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]


def profile_fit_error(t: Tensor, gamma: Tensor, x: Tensor, t_target: float, gamma_target: float) -> float:
    """||sum_i x_i p_i - p_target|| / ||p_target|| in L2(tau): how well the snapshots' profiles (steps t [S],
    exponents gamma [S], weights x [S]) represent the target. Near 0 inside the tracked range; it grows for a length
    far outside it, or a target step far from every snapshot's."""
    t, gamma, x = (torch.as_tensor(v, dtype=torch.float64) for v in (t, gamma, x))
    a = profile_inner(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    target = torch.tensor(float(t_target)), torch.tensor(float(gamma_target))
    b = profile_inner(t, gamma, *target)
    c = profile_inner(*target, *target)
    return float(torch.sqrt(torch.clamp(x @ a @ x - 2 * x @ b + c, min=0.0) / c))


def combine_states(states, coefficients: Tensor) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """sum_s coefficients[s] * states[s], key by key, accumulated in float64 and returned in each tensor's own
    dtype. `states` is an iterable of S state dicts, read once and one at a time (a long run's snapshots need not
    fit in memory together); coefficients [S] give one state dict, [S, T] a list of T (several targets in one
    pass). Tensors that are not floating point (counters) are taken from the last state."""
    coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
    if coefficients.ndim == 1:
        return _combine(states, coefficients[:, None])[0]
    return _combine(states, coefficients)


def _combine(states, coefficients: Tensor) -> list[dict[str, Tensor]]:
    """`combine_states` for coefficients [S, T]: T state dicts."""
    totals: list[dict[str, Tensor]] = [{} for _ in range(coefficients.shape[1])]
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for s, state in enumerate(states):
        if s >= coefficients.shape[0]:
            raise ValueError(f"{coefficients.shape[0]} coefficients for more states")
        for key, value in state.items():
            dtypes[key] = value.dtype
            for total, c in zip(totals, coefficients[s].tolist(), strict=True):
                if not value.is_floating_point():
                    total[key] = value.clone()
                elif key in total:
                    total[key].add_(value.double(), alpha=c)
                else:
                    total[key] = value.double() * c
        count += 1
    if count != coefficients.shape[0]:
        raise ValueError(f"{coefficients.shape[0]} coefficients for {count} states")
    return [{key: value.to(dtypes[key]) for key, value in total.items()} for total in totals]
