"""Static sampler settings and the σ-grid, resolved once on the host (spec §5.1, §5.3, §5.5).

``SamplerSettings`` is a frozen, hashable dataclass passed as a static argument to the jitted
samplers. Everything that depends on Python floats in the reference — the grid size from the NFE
label, the per-step churn γ_i, gated by comparing the float32 grid value as a float64 against the
window bounds — is resolved here, so the compiled program only sees arrays of per-step constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bitgen.config import ConfigError, DiffusionConfig, SamplerConfig, check_bit_constants
from bitgen.diffusion.entropy_schedule import EntropyTable
from bitgen.diffusion.grids import churn_window, entropic_grid, karras_grid
from bitgen.sampling.steps import Step, make_step, nfe_to_grid_points

_MAX_GAMMA = math.sqrt(2.0) - 1.0  # EDM bound: σ̂ ≤ √2·σ keeps the added variance ≤ σ²


@dataclass(frozen=True)
class SamplerSettings:
    """Everything static about one sampler run.

    method: "ddim" (Euler / DDIM η=0) | "heun" (EDM Alg. 2); sc_mode: "carry" | "refined"
    (together they name the step object, ``step``); gammas: churn γ_i per grid interval
    (length N-1; 0 = no churn on that step); s_noise: churn noise scale; ati_eta: ATI label shift
    (0 = off); seq_bits: S; guided: classifier-free guidance (every denoise runs both branches,
    the sampler needs a ``Cond`` with ``guidance``).
    """

    method: str
    sc_mode: str
    gammas: tuple[float, ...]
    s_noise: float = 1.003
    ati_eta: float = 0.0
    seq_bits: int = 0
    guided: bool = False

    def __post_init__(self):
        make_step(self.method, self.sc_mode)  # validates the pair
        if any(g < 0 or not math.isfinite(g) for g in self.gammas):
            raise ValueError(f"churn gammas must be finite and >= 0, got {self.gammas}")

    @property
    def n_points(self) -> int:
        return len(self.gammas) + 1

    @property
    def stochastic(self) -> bool:
        return any(g > 0 for g in self.gammas)

    @property
    def step(self) -> Step:
        """The step object of ``method`` / ``sc_mode``."""
        return make_step(self.method, self.sc_mode, self.guided)

    @property
    def nfe(self) -> int:
        """Actual network calls (incl. the final denoise)."""
        step = self.step
        return step.calls_per_step * len(self.gammas) + step.calls_per_denoise


def churn_gammas(grid: np.ndarray, s_churn: float, window: tuple[float, float] | None) -> np.ndarray:
    """γ_i [N-1] float64: min(S_churn/(N-1), √2-1) where s_tmin ≤ σ_i ≤ s_tmax, else 0.

    σ_i is the float32 grid value compared as float64 against the float64 bounds, as in the
    reference (so a float32 terminal 0.0799999982 < 0.08 is outside a window starting at 0.08).
    """
    grid = np.asarray(grid, np.float32)
    intervals = grid.shape[0] - 1
    if window is None or s_churn <= 0 or intervals <= 0:
        return np.zeros(max(intervals, 0), np.float64)
    lo, hi = window
    sig = grid[:-1].astype(np.float64)
    gamma = max(0.0, min(float(s_churn) / intervals, _MAX_GAMMA))
    return np.where((sig >= lo) & (sig <= hi), gamma, 0.0)


def build_settings(sampler_cfg: SamplerConfig, grid: np.ndarray, *, seq_bits: int,
                   table: EntropyTable | None,
                   diffusion_cfg: DiffusionConfig | None = None,
                   guided: bool = False) -> SamplerSettings:
    """Settings for ``grid`` from a SamplerConfig (``guided``: see ``SamplerSettings``).

    S_churn = gamma·(nfe − 1) as in the reference configs (so the per-step γ is
    gamma·(nfe−1)/(N−1)); the churn window is the entropy-CDF quantile window
    ``window_q`` of ``table`` clipped to [terminal_sigma, σ_max] (full band without a table).
    """
    diffusion_cfg = diffusion_cfg or DiffusionConfig()
    check_bit_constants(diffusion_cfg)
    s_churn = sampler_cfg.gamma * (sampler_cfg.nfe - 1)
    window = None
    if s_churn > 0:
        window = churn_window(table, *sampler_cfg.window_q, sampler_cfg.terminal_sigma,
                              diffusion_cfg.sigma_max)
    return SamplerSettings(
        method=sampler_cfg.name, sc_mode=sampler_cfg.sc_mode,
        gammas=tuple(float(g) for g in churn_gammas(grid, s_churn, window)),
        s_noise=sampler_cfg.s_noise, ati_eta=sampler_cfg.ati_eta, seq_bits=int(seq_bits),
        guided=guided)


def sampling_grid(sampler_cfg: SamplerConfig, table: EntropyTable | None,
                  diffusion_cfg: DiffusionConfig, guided: bool = False) -> np.ndarray:
    """The σ-grid a SamplerConfig asks for (grid type, N from nfe and ``guided``, terminal σ,
    σ_max)."""
    n = nfe_to_grid_points(sampler_cfg.nfe, sampler_cfg.name, sampler_cfg.sc_mode, guided)
    if n < 2:
        raise ConfigError(f"sampler.nfe={sampler_cfg.nfe} leaves fewer than 2 grid points for "
                          f"{sampler_cfg.name}/{sampler_cfg.sc_mode}; raise sampler.nfe")
    if sampler_cfg.grid == "karras":
        return karras_grid(n, sampler_cfg.terminal_sigma, diffusion_cfg.sigma_max, diffusion_cfg.rho)
    if table is None:
        raise ConfigError("sampler.grid=entropic needs an entropy table (load_entropy_table('lm1b'), "
                          "a run's table, ...); there is no silent Karras fallback. Pass a table or "
                          "set sampler.grid=karras.")
    return entropic_grid(table, n, sampler_cfg.terminal_sigma, diffusion_cfg.sigma_max)
