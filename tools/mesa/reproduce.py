"""Reproduce the mesa-optimisation result of Zheng et al. (NeurIPS 2024) for linear attention.

Usage: python tools/mesa/reproduce.py [--quick] [--figure PATH] [--init diagonal|gaussian] [--seed N]
Trains the one-layer linear attention by full-batch gradient descent on sparse, Gaussian and all-ones
first tokens, prints final ab beside its theoretical value, the prediction ratio and the test MSE,
and writes the ab-dynamics figure (ab against gradient-flow time for the Gaussian and sparse starts).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):          # run as a script: make `tools.mesa` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

from tools.mesa import data, model, theory, train

D = 5


class Setting(NamedTuple):
    """One training run; lr is for T = 100 and is scaled by 98 / (T - 2) (curvature grows with T)."""

    name: str
    start: str
    scale: float
    lr: float
    steps: int
    masked: bool


SETTINGS = (
    Setting("sparse s=1", "sparse", 1.0, 0.02, 90, False),
    Setting("gaussian sigma=1", "gaussian", 1.0, 0.002, 25, False),
    Setting("ones, masked", "ones", 1.0, 0.004, 25, True),
    Setting("ones, unmasked", "ones", 1.0, 0.002, 30, False),
)


class Scale(NamedTuple):
    """m: training (and test) sequences; T: length; step_factor: fraction of each setting's steps."""

    m: int
    T: int
    step_factor: float


FULL = Scale(10_000, 100, 1.0)
QUICK = Scale(300, 16, 0.4)


def best_diagonal_rate(f: model.Features) -> float:
    """Least-squares c for ŷ = c · (diagonal model at ab = 1) on f: a Monte Carlo check of the theory."""
    v = model.predict(model.diagonal_init(D, 1.0, 1.0), f)
    return float(jnp.sum((v.conj() * f.target).real) / jnp.sum(jnp.abs(v) ** 2))


def run_setting(s: Setting, scale: Scale, init: str, key: jax.Array) -> dict:
    """Train one setting; returns its final numbers and the ab trace against gradient-flow time."""
    k_train, k_test, k_init = jax.random.split(key, 3)
    train_f = model.features(data.sample(k_train, s.start, scale.m, D, s.scale), scale.T)
    test_f = model.features(data.sample(k_test, s.start, scale.m, D, s.scale), scale.T)
    params = model.diagonal_init(D) if init == "diagonal" else model.gaussian_init(k_init, D, 0.1)
    lr = s.lr * 98 / (scale.T - 2)
    steps = max(1, round(s.steps * scale.step_factor))
    params, trace = train.run(params, train_f, lr, steps, s.masked)
    return {
        "ab": float(model.ab(params)),
        "theory": theory.ab_star(s.start, D, scale.T, s.scale),
        "least_squares": best_diagonal_rate(test_f),
        "ratio": float(model.ratio(params, test_f)),
        "ratio_theory": theory.ratio_star(s.start, D, scale.T, s.scale),
        "mse": float(model.mse(params, test_f)),
        "off_diagonal": float(model.off_diagonal(params)),
        "balance_drift": float(abs(model.balance(params) - trace["balance"][0])),
        "time": lr * np.arange(steps + 1),
        "ab_trace": np.append(np.asarray(trace["ab"]), float(model.ab(params))),
    }


def plot(results: dict[str, dict], path: Path) -> None:
    """ab against gradient-flow time lr · step (log axis) for the Gaussian and sparse starts, theory dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, colour in (("gaussian sigma=1", "C0"), ("sparse s=1", "C1")):
        r = results[name]
        ax.plot(r["time"][1:], r["ab_trace"][1:], color=colour, marker=".", label=name)
        ax.axhline(r["theory"], color=colour, ls="--", lw=1, label=f"theory {r['theory']:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("gradient-flow time (lr × steps, log scale)")
    ax.set_ylabel("ab = mean_j a_j b_j")
    ax.set_title("Linear attention on x_{t+1} = W x_t: ab dynamics")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="m=300, T=16, 0.4 of the steps (for tests)")
    parser.add_argument("--figure", type=Path, default=Path(__file__).resolve().parents[2] / "docs" / "mesa_ab_dynamics.png")
    parser.add_argument("--init", choices=("diagonal", "gaussian"), default="diagonal")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    began = time.perf_counter()
    print(f"d={D} T={scale.T} m={scale.m} (test {scale.m}) init={args.init} seed={args.seed}")
    header = ("setting", "steps", "ab", "theory", "lsq", "ratio", "r.theory", "test MSE", "off-diag", "|Δ(a²-b²)|")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    results = {}
    for i, s in enumerate(SETTINGS):
        r = run_setting(s, scale, args.init, jax.random.fold_in(jax.random.key(args.seed), i))
        results[s.name] = r
        unmasked_ones = s.start == "ones" and not s.masked      # theory assumes a diagonal model
        theory_cols = ("—", "—") if unmasked_ones else (f"{r['theory']:.4f}", f"{r['ratio_theory']:.4f}")
        print(f"| {s.name} | {len(r['time']) - 1} | {r['ab']:.4f} | {theory_cols[0]} | {r['least_squares']:.4f} "
              f"| {r['ratio']:.4f} | {theory_cols[1]} | {r['mse']:.2e} | {r['off_diagonal']:.1e} "
              f"| {r['balance_drift']:.1e} |", flush=True)
    plot(results, args.figure)
    print(f"figure: {args.figure}\nwall time: {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
