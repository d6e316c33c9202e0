"""σ-grids for sampling (spec §5.1) and churn windows (§5.3).

Grids are computed once on the host in numpy float32, reproducing the reference's float32
arithmetic (including ``torch.linspace`` rounding, see ``reference_linspace``), and are then passed
to the jitted samplers as arrays. All grids are descending: σ_0 (largest) … σ_{N-1} (terminal).
The grid a SamplerConfig asks for, and the NFE accounting that sizes it, live with the sampler
steps (``bitgen.sampling.settings.sampling_grid``, ``bitgen.sampling.steps``).
"""

from __future__ import annotations

import math

import numpy as np

from bitgen.diffusion.entropy_schedule import (
    EntropyTable,
    closed_cdf,
    reference_linspace,
)

_F32 = np.float32


def karras_grid(n: int, sigma_lo: float, sigma_hi: float, rho: float = 7.0) -> np.ndarray:
    """EDM/Karras grid [n] from sigma_hi down to sigma_lo (endpoints set exactly), float32."""
    if n < 2:
        return np.array([sigma_hi], _F32)
    t = reference_linspace(0.0, 1.0, n)
    hi_root, lo_root = float(sigma_hi) ** (1.0 / rho), float(sigma_lo) ** (1.0 / rho)
    base = _F32(hi_root) + t * _F32(lo_root - hi_root)
    sigmas = np.power(base, _F32(rho)).astype(_F32)
    sigmas[0], sigmas[-1] = sigma_hi, sigma_lo
    return sigmas


def _interp_monotone(x: np.ndarray, y: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Piecewise-linear y(xq) on ascending x (clamped to its range), float32 like the reference."""
    xq = np.clip(np.asarray(xq, _F32), x[0], x[-1])
    idx = np.clip(np.searchsorted(x, xq, side="left"), 1, x.size - 1)
    x_lo, x_hi, y_lo, y_hi = x[idx - 1], x[idx], y[idx - 1], y[idx]
    w = (xq - x_lo) / np.maximum(x_hi - x_lo, _F32(1e-20))
    return (y_lo + w * (y_hi - y_lo)).astype(_F32)


def entropic_grid(table: EntropyTable, n: int, sigma_lo: float, sigma_hi: float, *,
                  blend_alpha: float = 0.0, rho: float = 7.0) -> np.ndarray:
    """Grid [n] equally spaced in the entropy CDF between σ_lo' and σ_hi', descending, float32.

    σ_lo' = max(sigma_lo, first midpoint), σ_hi' = min(sigma_hi, last midpoint); the CDF is
    interpolated linearly in σ between bin midpoints and inverted the same way. With
    ``blend_alpha`` > 0 the grid is mixed with the Karras grid over [sigma_lo, sigma_hi].
    """
    sig = np.asarray(table.sigmas, _F32)
    cdf = closed_cdf(np.asarray(table.cdf, _F32))
    lo_eff = max(float(sigma_lo), float(sig[0]))
    hi_eff = min(float(sigma_hi), float(sig[-1]))
    if lo_eff > hi_eff:  # requested range lies outside the table: a constant grid
        return np.full(n, max(min(sigma_hi, float(sig[-1])), float(sig[0])), _F32)
    f_lo, f_hi = _interp_monotone(sig, cdf, np.array([lo_eff, hi_eff], _F32))
    if abs(float(f_hi - f_lo)) < 1e-12:  # no entropy mass in range: log-uniform grid
        grid = np.exp(reference_linspace(math.log(lo_eff), math.log(hi_eff), n))[::-1].astype(_F32)
    else:
        u = f_lo + reference_linspace(0.0, 1.0, n) * (f_hi - f_lo)
        u = np.clip(u, cdf[0], _F32(1.0 - 1e-7))
        idx = np.clip(np.searchsorted(cdf, u, side="left"), 1, cdf.size - 1)
        w = (u - cdf[idx - 1]) / np.maximum(cdf[idx] - cdf[idx - 1], _F32(1e-20))
        grid = (sig[idx - 1] + w * (sig[idx] - sig[idx - 1])).astype(_F32)[::-1].copy()
    grid[0], grid[-1] = hi_eff, lo_eff
    if blend_alpha > 0:
        karras = karras_grid(n, sigma_lo, sigma_hi, rho)
        grid = (_F32(1.0 - blend_alpha) * grid + _F32(blend_alpha) * karras).astype(_F32)
    return grid


def entropy_quantile(table: EntropyTable, q: float) -> float:
    """σ at CDF level q (linear interpolation between midpoints; q ≤ cdf[0] gives the first midpoint).

    Like the reference, q = 0 returns the first midpoint even when that bin has zero mass.
    """
    sig = np.asarray(table.sigmas, _F32)
    cdf = closed_cdf(np.asarray(table.cdf, _F32))
    q32 = _F32(min(1.0, max(0.0, float(q))))
    i = int(np.clip(np.searchsorted(cdf, q32, side="left"), 0, cdf.size - 1))
    if i == 0:
        return float(sig[0])
    w = (q32 - cdf[i - 1]) / max(cdf[i] - cdf[i - 1], _F32(1e-20))
    return float(sig[i - 1] + _F32(w) * (sig[i] - sig[i - 1]))


def churn_window(table: EntropyTable | None, q_lo: float, q_hi: float, terminal_sigma: float,
                 sigma_max: float) -> tuple[float, float]:
    """(s_tmin, s_tmax): σ at entropy quantiles q_lo/q_hi clipped to [terminal_sigma, sigma_max].

    Without a table the window is the full band [terminal_sigma, sigma_max].
    """
    if table is None:
        lo, hi = terminal_sigma, sigma_max
    else:
        q_lo, q_hi = sorted((min(1.0, max(0.0, q_lo)), min(1.0, max(0.0, q_hi))))
        lo, hi = entropy_quantile(table, q_lo), entropy_quantile(table, q_hi)
    lo = max(terminal_sigma, min(float(lo), sigma_max))
    hi = max(terminal_sigma, min(float(hi), sigma_max))
    return (hi, lo) if hi < lo else (lo, hi)
