"""In-process 2-D demo of the `fm` core: train FM-OT and OT-CFM, sample, and compare the NLL with the truth.

    python -m jobs.toy2d [--data checkerboard] [--steps 1500] [--out outputs/toy2d]

Saves a figure (model density, samples, trajectories per method) and prints a table; the last stdout line is one
JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fm.data import TOY_DENSITIES, TOY_SETS, sample_toy, toy_entropy
from fm.likelihood import LikelihoodSettings, log_likelihood, mean_and_stderr
from fm.methods import METHODS, make_method
from fm.metrics import wasserstein2
from fm.models import MLP
from fm.solvers import ode_sample
from fm.training import fit_toy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="checkerboard", choices=TOY_SETS)
    p.add_argument("--methods", default="fm_ot,otcfm", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/toy2d")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}")
    if args.steps < 1 or args.batch < 2 or args.samples < 2:
        p.error("--steps must be >= 1, --batch and --samples >= 2")
    return args


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    has_density = args.data in TOY_DENSITIES
    entropy = toy_entropy(args.data, generator=torch.Generator().manual_seed(1)) if has_density else None
    ref = sample_toy(args.data, args.samples, torch.Generator().manual_seed(args.seed + 100))
    test = sample_toy(args.data, 1000, torch.Generator().manual_seed(args.seed + 200))
    rows, figs = [], []
    for name in args.methods:
        start = time.perf_counter()
        method = make_method(name)
        ema, losses = fit_toy(
            MLP(2, 128, 3), method, args.data, args.steps, args.batch, lr=2e-3, ema_decay=0.99, seed=args.seed
        )
        train_s = time.perf_counter() - start
        fn = method.velocity(ema.module)
        x_0 = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(args.seed + 300))
        sample = ode_sample(fn, x_0, "dopri5", atol=1e-5, rtol=1e-5, t_1=method.t_max, t_limit=method.t_limit)
        traj = ode_sample(fn, x_0[:64], "rk4", steps=20, t_1=method.t_max, return_trajectory=True).trajectory
        lik = log_likelihood(fn, test, LikelihoodSettings(t_1=method.t_max))
        nll, nll_se = mean_and_stderr(-lik.log_p)
        rows.append(
            {
                "method": name,
                "train_s": round(train_s, 1),
                "final_loss": sum(losses[-100:]) / 100,
                "w2": wasserstein2(sample.x_1, ref),
                "nll": nll,
                "nll_stderr": nll_se,
                "nll_gap": None if entropy is None else nll - entropy,
                "sample_nfe": sample.nfe,
                "nll_nfe": lik.nfe,
            }
        )
        figs.append((name, fn, sample.x_1, traj, method.t_max))
    figure = out / f"{args.data}.png"
    _plot(figs, ref, figure)
    w2_ref = wasserstein2(sample_toy(args.data, args.samples, torch.Generator().manual_seed(args.seed + 400)), ref)
    print(
        f"\n{args.data}: {args.steps} steps, batch {args.batch}, MLP(2, 128, 3); dopri5 atol=rtol=1e-5; "
        f"W2 on {args.samples} samples (data vs data: {w2_ref:.3f}); NLL on 1000 test points, in nats"
        + (f"; true entropy {entropy:.3f}" if entropy is not None else "")
    )
    print("| method | train s | loss | W2 | NLL ± se | NLL - entropy | NFE sample | NFE NLL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        gap = "n/a" if r["nll_gap"] is None else f"{r['nll_gap']:.3f}"
        print(
            f"| {r['method']} | {r['train_s']} | {r['final_loss']:.3f} | {r['w2']:.3f} | {r['nll']:.3f} ± "
            f"{r['nll_stderr']:.3f} | {gap} | {r['sample_nfe']} | {r['nll_nfe']} |"
        )
    print(f"figure: {figure}")
    return {"data": args.data, "entropy": entropy, "w2_data_vs_data": w2_ref, "figure": str(figure), "rows": rows}


def _plot(figs, ref, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(figs)
    fig, axes = plt.subplots(n, 3, figsize=(12, 4 * n), squeeze=False)
    lim = float(ref.abs().max()) * 1.1
    grid = torch.linspace(-lim, lim, 60)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    for row, (name, fn, samples, traj, t_1) in zip(axes, figs, strict=True):
        log_p = log_likelihood(fn, pts, LikelihoodSettings(solver="rk4", steps=20, t_1=t_1)).log_p
        row[0].imshow(log_p.exp().reshape(60, 60).numpy(), extent=(-lim, lim, -lim, lim), origin="lower")
        row[0].set_title(f"{name}: model density (rk4, 20 steps)")
        row[1].scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.3, label="data")
        row[1].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.3, label="samples")
        row[1].legend(markerscale=8)
        row[1].set_title(f"{name}: samples (dopri5)")
        for k in range(traj.shape[1]):
            row[2].plot(traj[:, k, 0], traj[:, k, 1], lw=0.6, color="tab:blue", alpha=0.6)
        row[2].scatter(traj[0, :, 0], traj[0, :, 1], s=4, color="black", label="x_0 (t=0)")
        row[2].scatter(traj[-1, :, 0], traj[-1, :, 1], s=4, color="tab:red", label="x_1 (t=1)")
        row[2].legend()
        row[2].set_title(f"{name}: trajectories")
        for ax in row:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    result = run(parse_args(argv))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
