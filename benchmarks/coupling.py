"""The cost of a minibatch coupling, side by side in one process.

    python -m benchmarks.coupling solve [--batch 256] [--repeats 50] [--threads 1]
    python -m benchmarks.coupling step [--batch 256] [--steps 400] [--buffer 8] [--threads 1]

`solve`: SB-CFM's entropic plan against the exact OT solve.
For each data set (the 2-D checkerboard; scikit-learn's digits as 64-d points in [-1, 1]) and batch, the same pairs of
noise x_0 and data x_1 go through: the exact OT plan (`ExactOTCoupling`, POT's network simplex), SB-CFM's coupling
(`EntropicOTCoupling`: `fm.couplings.sinkhorn_log`, stopped at an L1 marginal error of 1e-4, then the pairs drawn),
and POT's own `ot.sinkhorn(method="sinkhorn_log")` at its defaults, which this project used before. The median
time of each, and the ratios to the exact solve, are printed as one JSON object. reg = 2 sigma^2 with SB-CFM's
default sigma = 1, and a smaller reg (sigma = 0.5) as the harder case.

`step`: a training step of the MLP (3 x 256) on the 2-D checkerboard at batch 256, with torch on one thread, for
I-CFM and OT-CFM, each with the pairing in the step (the exact solve on the critical path) and made `--buffer` steps
ahead in a reader thread (`fm.training.read_ahead` + `pair_step`, as every Ray Train worker does). Batches are
drawn beforehand; the mean step time over `--steps` steps after 20 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ot
import torch

from fm.couplings import EntropicOTCoupling, ExactOTCoupling, squared_cost
from fm.data import sample_toy


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str, x_1: torch.Tensor, reg: float, repeats: int, g: torch.Generator) -> dict:
    x_0 = torch.randn(x_1.shape, generator=g)
    exact, entropic = ExactOTCoupling(), EntropicOTCoupling(reg)
    cost = squared_cost(x_0, x_1).numpy()
    n = x_1.shape[0]
    exact_ms = _median_ms(lambda: exact(x_0, x_1, generator=g), repeats)
    ours_ms = _median_ms(lambda: entropic(x_0, x_1, generator=g), repeats)
    pot_ms = _median_ms(
        lambda: ot.sinkhorn(ot.unif(n), ot.unif(n), cost, reg=reg, method="sinkhorn_log", numItermax=10_000),
        max(3, repeats // 10),
    )
    return {
        "data": name,
        "batch": n,
        "reg": reg,
        "exact_ot_ms": round(exact_ms, 2),
        "sbcfm_ms": round(ours_ms, 2),
        "sbcfm_iterations": entropic.last_iterations,
        "sbcfm_marginal_error": entropic.last_marginal_error,
        "pot_sinkhorn_log_ms": round(pot_ms, 2),
        "sbcfm_over_exact": round(ours_ms / exact_ms, 3),
        "pot_sinkhorn_over_exact": round(pot_ms / exact_ms, 3),
    }


def steps(batch: int, n_steps: int, buffer: int) -> dict:
    from fm.methods import make_method
    from fm.models import MLP
    from fm.seeding import generator
    from fm.training import pair_step, read_ahead, train_step

    g = torch.Generator().manual_seed(0)
    data = [sample_toy("checkerboard", batch, g) for _ in range(n_steps + 20)]

    def run(name: str, ahead: int | None) -> float:
        torch.manual_seed(0)
        model, method = MLP(2, 256, 3), make_method(name)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if ahead is None:
            items = ((None, x_1, generator(0, 0, k)) for k, x_1 in enumerate(data))
        else:
            items = (
                (p, None, None)
                for p in read_ahead(
                    enumerate(data), lambda it: pair_step(method, it[1], None, generator(0, 0, it[0])), ahead
                )
            )
        start = 0.0
        for k, (pairs, x_1, gen) in enumerate(items):
            if k == 20:
                start = time.perf_counter()
            train_step(model, method, opt, x_1, None, gen, pairs=pairs)
        return 1e3 * (time.perf_counter() - start) / n_steps

    icfm, icfm_ahead = run("icfm", None), run("icfm", buffer)
    in_step, ahead = run("otcfm", None), run("otcfm", buffer)
    return {
        "batch": batch,
        "steps": n_steps,
        "buffer": buffer,
        "icfm_in_step_ms": round(icfm, 3),
        "icfm_ahead_ms": round(icfm_ahead, 3),
        "otcfm_in_step_ms": round(in_step, 3),
        "otcfm_ahead_ms": round(ahead, 3),
        "otcfm_over_icfm_in_step": round(in_step / icfm, 3),
        "otcfm_over_icfm_ahead": round(ahead / icfm_ahead, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["solve", "step"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--buffer", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "step":
        print(json.dumps({"threads": args.threads, **steps(args.batch, args.steps, args.buffer)}, indent=1))
        return
    g = torch.Generator().manual_seed(0)
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().data).float() / 16 * 2 - 1  # [1797, 64] in [-1, 1], as trained on
    rows = []
    for reg in (2.0, 0.5):
        rows.append(measure("checkerboard (2-D)", sample_toy("checkerboard", args.batch, g), reg, args.repeats, g))
        pick = torch.randperm(len(digits), generator=g)[: args.batch]
        rows.append(measure("sklearn digits (64-D)", digits[pick], reg, args.repeats, g))
    print(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
