"""First-order forward error bounds for the sampler traces (derivation: docs/parity.md).

bitgen evaluates every update op for op in the reference's order with the same float32 rounding
(``bitgen.sampling.steps._rounded`` stops FMA contraction and reassociation), so two runs can
differ only where an input differs: the denoiser output D. Given a bound on each call's |ΔD|,
the state difference obeys, per element and step,

    E' ≤ |∂x'/∂x̂|·Ê + Σ_calls |∂x'/∂D|·ΔD + Σ_ops |∂x'/∂v|·2u|v|,
    Ê = E + 2u|x̂| on churned steps (else E),

with u = 2⁻²⁴ (float32 round-to-nearest) and the op values v taken from the reference trace.
``trace_bounds`` runs this recurrence; the caller supplies ΔD for each model call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

U = 2.0 ** -24  # float32 unit roundoff
# A float32 sigmoid 1/(1 + exp(−ℓ)) with an exp good to 1 ulp (relative error ≤ 2u) has relative
# error ≤ 2u + u + u = 4u (exp, sum, division; torch and XLA both evaluate it this way), so two of
# them differ by at most 8u·|D|. The D checks test this directly.
SIGMOID_GAP = 8 * U

# delta_D(call, x_err, x0_err) -> bound on |ΔD| [B,S] for model call `call` (call order), given
# bounds on the differences of its inputs x and x0_hat.
DeltaD = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def sigmoid_gap(D: np.ndarray) -> np.ndarray:
    """Largest difference between two float32 sigmoids with value D (see SIGMOID_GAP)."""
    return SIGMOID_GAP * np.abs(np.asarray(D, np.float64))


def trace_bounds(method: str, ref: dict[str, np.ndarray], grid: np.ndarray, sigma_hat: np.ndarray,
                 churned: np.ndarray, delta_D: DeltaD) -> dict[str, np.ndarray]:
    """Bounds [N-1,B,S] on |Δx_hat|, |Δx_steps|, |Δx_pred|, |ΔD_steps|, |ΔD2_steps| and [B,S] on
    |Δx_final|, |ΔD_final|, from the reference arrays ``ref`` (fixture names, float64)."""
    heun = method == "heun"
    x_hat, D, x_new = ref["x_hat"], ref["D_steps"], ref["x_steps"]
    err = np.zeros_like(x_hat[0])
    x0_err = np.zeros_like(err)
    out = {k: [] for k in ("x_hat", "x_steps", "x_pred", "D_steps", "D2_steps")}
    per = 2 if heun else 1
    for i in range(grid.shape[0] - 1):
        s, n = float(sigma_hat[i]), float(grid[i + 1])
        h = n - s
        e_hat = err + (2 * U * np.abs(x_hat[i]) if churned[i] else 0.0)
        dD = delta_D(per * i, e_hat, x0_err)
        a1 = D[i] - x_hat[i]
        d1 = -a1 / s
        if heun:
            x_pred, D2 = ref["x_pred"][i], ref["D2_steps"][i]
            e_pred = _euler_bound(e_hat, dD, a1, x_pred, s, n)
            dD2 = delta_D(per * i + 1, e_pred, dD)
            d2 = (x_pred - D2) / n
            half = abs(0.5 * h)
            adj_d1 = 0.5 * h * (1.0 + h / n)  # ∂x'/∂d1, through x_pred and directly
            k2 = abs(h) / (2 * n)  # |∂x'/∂x_pred| = |∂x'/∂D2|
            # x' | (½h)·(d1+d2) and d1+d2 | d2, its quotient and difference | x_pred and h·d1 |
            # d1, its quotient and difference (each |∂x'/∂v|·|v|)
            rounding = 2 * U * (np.abs(x_new[i]) + 2 * half * np.abs(d1 + d2) + 3 * half * np.abs(d2)
                                + k2 * (np.abs(x_pred) + np.abs(h * d1)) + 3 * abs(adj_d1) * np.abs(d1))
            err = (n / s) * e_hat + (abs(adj_d1) / s) * dD + k2 * dD2 + rounding
            out["x_pred"].append(e_pred)
            out["D2_steps"].append(dD2)
        else:
            err = _euler_bound(e_hat, dD, a1, x_new[i], s, n)
        out["x_hat"].append(e_hat)
        out["D_steps"].append(dD)
        out["x_steps"].append(err)
        x0_err = dD  # carry: the next step's x0_hat is this step's D
    bounds = {k: np.stack(v) for k, v in out.items() if v}
    bounds["x_final"] = err
    bounds["D_final"] = delta_D(per * (grid.shape[0] - 1), err, x0_err)
    return bounds


def _euler_bound(e_hat, dD, a, x_out, s, n):
    """x_out = x̂ + h·((−s)·((D − x̂)/s²)): ∂/∂x̂ = n/s, ∂/∂D = 1 − n/s; four rounded ops of size
    (1 − n/s)|D − x̂| (difference, quotient, direction, product) and the sum |x_out|."""
    c = 1.0 - n / s
    return (n / s) * e_hat + c * dD + 2 * U * (4 * c * np.abs(a) + np.abs(x_out))
