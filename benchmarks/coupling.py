"""The cost of a minibatch coupling: SB-CFM's entropic plan against the exact OT solve, side by side.

    python -m benchmarks.coupling [--batch 256] [--repeats 50] [--threads 1]

For each data set (the 2-D checkerboard; scikit-learn's digits as 64-d points in [-1, 1]) and batch, the same pairs of
noise x_0 and data x_1 go through: the exact OT plan (`ExactOTCoupling`, POT's network simplex), SB-CFM's coupling
(`EntropicOTCoupling`: `fm.couplings.sinkhorn_log`, stopped at an L1 marginal error of 1e-4, then the pairs drawn),
and POT's own `ot.sinkhorn(method="sinkhorn_log")` at its defaults, which this project used before. The median
time of each, and the ratios to the exact solve, are printed as one JSON object. reg = 2 sigma^2 with SB-CFM's
default sigma = 1, and a smaller reg (sigma = 0.5) as the harder case.
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
    pot_ms = _median_ms(lambda: ot.sinkhorn(ot.unif(n), ot.unif(n), cost, reg=reg, method="sinkhorn_log",
                                            numItermax=10_000), max(3, repeats // 10))
    return {"data": name, "batch": n, "reg": reg, "exact_ot_ms": round(exact_ms, 2),
            "sbcfm_ms": round(ours_ms, 2), "sbcfm_iterations": entropic.last_iterations,
            "sbcfm_marginal_error": entropic.last_marginal_error, "pot_sinkhorn_log_ms": round(pot_ms, 2),
            "sbcfm_over_exact": round(ours_ms / exact_ms, 3), "pot_sinkhorn_over_exact": round(pot_ms / exact_ms, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
