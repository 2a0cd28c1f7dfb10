"""In-process demo of Riemannian Flow Matching and Action Matching (the `fm` core alone), with RESULTS tables.

    python -m jobs.geometry [--part rfm|am|all] [--seeds 0,1,2] [--out outputs/geometry]

RFM: the von Mises-Fisher mixture on S^2 and the dihedral wrapped-normal mixture on T^2; per seed, NLL of
held-out points (Riemannian change of variables) against the true entropy, and the geodesic W2 from samples to
fresh data against the data-to-data floor. AM: the rotating, spreading mixture observed at 5 times; Action
Matching against CFM on independent (and on minibatch-OT) pairs of consecutive snapshots, same model, steps and
batch; per observed time, W2 from the transported held-out first snapshot to held-out data at that time, against
the data-to-data floor. Prints markdown tables (mean ± std over seeds), saves figures; the last stdout line is a
JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from fm.action_matching import transport
from fm.dynamics import OBSERVED_TIMES, get_dynamics, snapshots
from fm.likelihood import LikelihoodSettings
from fm.manifold_data import MANIFOLD_SETS, manifold_of, manifold_set_entropy, sample_manifold_set
from fm.methods import make_method
from fm.metrics import wasserstein2
from fm.models import MLP
from fm.riemannian import geodesic_wasserstein2, manifold_log_likelihood, manifold_ode_sample
from fm.training import fit
from jobs.cli import int_list
from pipelines.core.figures import save_figure, save_points_figure

AM_METHODS = ("am", "snapshot_icfm", "snapshot_otcfm")
AM_DATA = "rotating-gmm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=("rfm", "am", "all"))
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated training seeds")
    p.add_argument("--rfm-steps", type=int, default=4000)
    p.add_argument("--am-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n", type=int, default=2000, help="points on each side of one W2 (and held-out points for NLL)")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="independent draws each W2 and its floor are averaged over (a mixture's W2 at a few thousand "
        "points is dominated by the draw's component counts)",
    )
    p.add_argument("--am-methods", default=",".join(AM_METHODS), help="comma-separated, from " + ", ".join(AM_METHODS))
    p.add_argument("--out", default="outputs/geometry")
    args = p.parse_args(argv)
    args.am_methods = args.am_methods.split(",")
    for m in args.am_methods:
        if m not in AM_METHODS:
            p.error(f"--am-methods: unknown method {m!r}; allowed: {', '.join(AM_METHODS)}")
    for key in ("rfm_steps", "am_steps", "batch", "hidden", "n", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1; got {getattr(args, key)}")
    return args


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def _mean_w2(w2, x: torch.Tensor, ref: torch.Tensor, repeats: int) -> float:
    """The mean of w2 over `repeats` disjoint equal chunks of x and ref."""
    return float(np.mean([w2(a, b) for a, b in zip(x.chunk(repeats), ref.chunk(repeats), strict=True)]))


def run_rfm(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Train RFM on a manifold set; NLL, geodesic W2 and the floor; returns the figures and the samples."""
    manifold = manifold_of(name)
    method = make_method("rfm", manifold=MANIFOLD_SETS[name])
    train = sample_manifold_set(name, 50_000, torch.Generator().manual_seed(1000 + seed))
    model = MLP(manifold.ambient_dim, args.hidden, 3, manifold=MANIFOLD_SETS[name])
    start = time.perf_counter()
    ema, losses = fit(
        model,
        method,
        lambda g: (train[torch.randint(len(train), (args.batch,), generator=g)], None),
        args.rfm_steps,
        lr=1e-3,
        ema_decay=0.999,
        seed=seed,
        schedule="cosine",
    )
    train_s = time.perf_counter() - start
    net = ema.module.eval()
    m = args.n * args.repeats
    held_out = sample_manifold_set(name, m, torch.Generator().manual_seed(2000 + seed))
    # dopri5 at 1e-5, exact divergence, on the first n held-out points
    lik = manifold_log_likelihood(net, manifold, held_out[: args.n], LikelihoodSettings())
    x_0 = manifold.random_uniform(m, torch.Generator().manual_seed(3000 + seed))
    samples = manifold_ode_sample(net, manifold, x_0, "rk4", steps=50)
    fresh = sample_manifold_set(name, m, torch.Generator().manual_seed(4000 + seed))
    nll = -lik.log_p.mean().item()

    def w2(a, b):
        return geodesic_wasserstein2(manifold, a, b)

    return {
        "data": name,
        "seed": seed,
        "nll": nll,
        "nll_stderr": lik.log_p.std().item() / math.sqrt(args.n),
        "likelihood_nfe": lik.nfe,
        "w2": _mean_w2(w2, samples.x_1, fresh, args.repeats),
        "w2_floor": _mean_w2(w2, held_out, fresh, args.repeats),
        "sample_nfe": samples.nfe,
        "final_loss": float(np.mean(losses[-100:])),
        "train_s": train_s,
        "samples": samples.x_1[: args.n],
    }


def run_am(method_name: str, seed: int, args: argparse.Namespace) -> dict:
    """Train a snapshot method on the rotating mixture; W2 per observed time against the floor."""
    method = make_method(method_name, times=list(OBSERVED_TIMES))
    x, k = snapshots(AM_DATA, 10_000, generator=torch.Generator().manual_seed(1000 + seed))
    action = method.prediction == "action"
    # an action's time derivative is part of its loss: smooth time features (scale 1) rather than the default 1000
    model = MLP(2, args.hidden, 3, out_dim=1 if action else None, time_scale=1.0 if action else 1000.0)

    def batch(g):
        idx = torch.randint(len(x), (args.batch,), generator=g)
        return x[idx], k[idx]

    start = time.perf_counter()
    ema, losses = fit(model, method, batch, args.am_steps, lr=1e-3, ema_decay=0.999, seed=seed, schedule="cosine")
    train_s = time.perf_counter() - start
    dyn = get_dynamics(AM_DATA)
    g = torch.Generator().manual_seed(2000 + seed)
    m = args.n * args.repeats
    x_0 = dyn.sample(OBSERVED_TIMES[0], m, g)
    path, nfe = transport(method.velocity(ema.module.eval()), x_0, list(OBSERVED_TIMES), "rk4", steps=20)
    w2, floor = [], []
    for t, x_t in zip(OBSERVED_TIMES, path, strict=True):
        held_out, other = dyn.sample(t, m, g), dyn.sample(t, m, g)
        w2.append(_mean_w2(wasserstein2, x_t, held_out, args.repeats))
        floor.append(_mean_w2(wasserstein2, other, held_out, args.repeats))
    return {
        "method": method_name,
        "seed": seed,
        "w2": w2,
        "w2_floor": floor,
        "nfe": nfe,
        "train_s": train_s,
        "final_loss": float(np.mean(losses[-100:])),
        "path": [p[: args.n].detach() for p in path],
    }


def rfm_table(results: list[dict], entropies: dict) -> str:
    lines = [
        "| data | manifold | seeds | NLL (nats) | true entropy | NLL - entropy | geodesic W2 | W2 floor | "
        "W2 / floor | likelihood NFE | train s |",
        "| " + " | ".join(["---"] * 11) + " |",
    ]
    for name in MANIFOLD_SETS:
        rows = [r for r in results if r["data"] == name]
        if not rows:
            continue
        ent = entropies[name][0]
        lines.append(
            f"| {name} | {manifold_of(name).label} | {len(rows)} | {_mean_std([r['nll'] for r in rows])} | "
            f"{ent:.3f} ± {entropies[name][1]:.3f} | {_mean_std([r['nll'] - ent for r in rows])} | "
            f"{_mean_std([r['w2'] for r in rows])} | {_mean_std([r['w2_floor'] for r in rows])} | "
            f"{_mean_std([r['w2'] / r['w2_floor'] for r in rows])} | "
            f"{np.mean([r['likelihood_nfe'] for r in rows]):.0f} | "
            f"{np.mean([r['train_s'] for r in rows]):.0f} |"
        )
    return "\n".join(lines)


def am_table(results: list[dict]) -> str:
    times = OBSERVED_TIMES[1:]
    lines = [
        "| method | seeds | " + " | ".join(f"W2 / floor at t={t}" for t in times) + " | worst W2 / floor | train s |",
        "| " + " | ".join(["---"] * (len(times) + 4)) + " |",
    ]
    for name in AM_METHODS:
        rows = [r for r in results if r["method"] == name]
        if not rows:
            continue
        ratios = np.array([[w / f for w, f in zip(r["w2"][1:], r["w2_floor"][1:], strict=True)] for r in rows])
        cells = [_mean_std(list(ratios[:, i])) for i in range(len(times))]
        lines.append(
            f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {_mean_std(list(ratios.max(1)))} | "
            f"{np.mean([r['train_s'] for r in rows]):.0f} |"
        )
    floor = np.array([r["w2_floor"][1:] for r in results])
    w2 = {name: np.array([r["w2"][1:] for r in results if r["method"] == name]) for name in AM_METHODS}
    lines += [
        "",
        "| W2 at t | " + " | ".join(str(t) for t in times) + " |",
        "| " + " | ".join(["---"] * (len(times) + 1)) + " |",
        "| data-to-data floor | " + " | ".join(_mean_std(list(floor[:, i])) for i in range(len(times))) + " |",
    ]
    lines += [
        f"| {name} | " + " | ".join(_mean_std(list(v[:, i])) for i in range(len(times))) + " |"
        for name, v in w2.items()
        if len(v)
    ]
    return "\n".join(lines)


def save_figures(rfm: list[dict], am: list[dict], out: Path) -> list[str]:
    """Samples beside data on S^2 (Lambert's cylindrical equal-area projection) and T^2 (`save_points_figure`), and
    the AM transport at every observed time beside held-out data; one seed each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in [r for r in rfm if r["seed"] == rfm[0]["seed"]]:
        data = sample_manifold_set(r["data"], len(r["samples"]), torch.Generator().manual_seed(5)).numpy()
        panels = [(f"{r['data']}: data", data), (f"{r['data']}: RFM samples (RK4, 50 steps)", r["samples"].numpy())]
        paths.append(str(save_points_figure(panels, out / f"rfm_{r['data']}.png", MANIFOLD_SETS[r["data"]])))
    rows = [r for r in am if r["seed"] == am[0]["seed"]] if am else []
    if rows:
        dyn = get_dynamics(AM_DATA)
        fig, axes = plt.subplots(
            len(rows) + 1, len(OBSERVED_TIMES), figsize=(3 * len(OBSERVED_TIMES), 3 * (len(rows) + 1))
        )
        for j, t in enumerate(OBSERVED_TIMES):
            pts = dyn.sample(t, 2000, torch.Generator().manual_seed(6)).numpy()
            axes[0, j].scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="k")
            axes[0, j].set_title(f"data, t={t}")
            for i, r in enumerate(rows, 1):
                p = r["path"][j].numpy()
                axes[i, j].scatter(p[:, 0], p[:, 1], s=1, alpha=0.4)
                axes[i, j].set_title(f"{r['method']}, t={t}")
        for ax in axes.flat:
            ax.set_xlim(-4.5, 4.5)
            ax.set_ylim(-4.5, 4.5)
        paths.append(str(save_figure(fig, out / "am_transport.png", dpi=90)))
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rfm, am, entropies = [], [], {}
    if args.part in ("rfm", "all"):
        for name in MANIFOLD_SETS:
            entropies[name] = manifold_set_entropy(name)
            for seed in args.seeds:
                r = run_rfm(name, seed, args)
                rfm.append(r)
                print(
                    f"[geometry] rfm {name} seed {seed}: NLL {r['nll']:.3f} (entropy {entropies[name][0]:.3f}), "
                    f"W2 {r['w2']:.3f} (floor {r['w2_floor']:.3f}), {r['train_s']:.0f} s",
                    flush=True,
                )
    if args.part in ("am", "all"):
        for name in args.am_methods:
            for seed in args.seeds:
                r = run_am(name, seed, args)
                am.append(r)
                print(
                    f"[geometry] {name} seed {seed}: W2 / floor "
                    + ", ".join(f"{w / f:.2f}" for w, f in zip(r["w2"][1:], r["w2_floor"][1:], strict=True))
                    + f", {r['train_s']:.0f} s",
                    flush=True,
                )
    figures = save_figures(rfm, am, Path(args.out))
    if rfm:
        print("\n" + rfm_table(rfm, entropies))
    if am:
        print("\n" + am_table(am))
    summary = {
        "rfm": [{k: v for k, v in r.items() if k != "samples"} for r in rfm],
        "am": [{k: v for k, v in r.items() if k != "path"} for r in am],
        "entropies": entropies,
        "figures": figures,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
