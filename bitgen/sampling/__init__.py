"""Samplers for bitstream diffusion: σ-grid + Euler/DDIM or Heun with EDM churn (spec §5).

Typical use::

    table = load_entropy_table("lm1b")
    draw = build_sampler(model_cfg, sampler_cfg, table, model_cfg.seq_bits)
    result = draw(params, jax.random.key(0))      # SampleResult(bits, D, x, nfe)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitgen.config import DiffusionConfig, ModelConfig, SamplerConfig
from bitgen.diffusion.entropy_schedule import EntropyTable
from bitgen.diffusion.grids import sampling_grid
from bitgen.sampling.samplers import (
    SampleResult,
    StepSchedule,
    ati_label,
    matched_filter_denoiser,
    sample,
    sample_from_noise,
    sampler_step,
    step_schedule,
)
from bitgen.sampling.settings import SamplerSettings, build_settings, churn_gammas

__all__ = [
    "SampleResult", "SamplerSettings", "StepSchedule", "ati_label", "build_sampler",
    "build_settings", "churn_gammas", "matched_filter_denoiser", "sample", "sample_from_noise",
    "sampler_step", "sdt_denoiser", "step_schedule",
]


@functools.lru_cache(maxsize=None)
def sdt_denoiser(model_cfg: ModelConfig):
    """The SDT bound to ``model_cfg``, one object per config value.

    The denoiser is a static argument of the jitted samplers, compared by identity; a fresh
    ``functools.partial`` per call would recompile the sampler every time.
    """
    from bitgen.diffusion.denoiser import denoise

    return functools.partial(denoise, cfg=model_cfg)


def build_sampler(model_cfg: ModelConfig, sampler_cfg: SamplerConfig, table: EntropyTable | None,
                  seq_bits: int, diffusion_cfg: DiffusionConfig | None = None, *,
                  denoiser=None):
    """Resolve grid and settings on the host; return ``fn(params, key, batch=None) -> SampleResult``.

    ``denoiser`` defaults to the SDT (``bitgen.diffusion.denoiser.denoise`` bound to model_cfg).
    ``batch`` defaults to ``sampler_cfg.batch_size``. The sampler compiles once per (settings,
    batch, parameter shapes, denoiser): the default denoiser is one object per model config, so
    samplers built again with equal settings (another seed, another sweep visit) reuse the program.
    """
    if seq_bits != model_cfg.seq_bits:
        raise ValueError(f"seq_bits={seq_bits} does not match the model's "
                         f"seq_tokens*patch_size={model_cfg.seq_bits}")
    diffusion_cfg = diffusion_cfg or DiffusionConfig()
    grid = sampling_grid(sampler_cfg, table, diffusion_cfg)
    settings = build_settings(sampler_cfg, grid, seq_bits=seq_bits, table=table,
                              diffusion_cfg=diffusion_cfg)
    if denoiser is None:
        denoiser = sdt_denoiser(model_cfg)
    grid_device = jnp.asarray(grid)

    def draw(params, key: jax.Array, batch: int | None = None) -> SampleResult:
        return sample(params, key, batch=batch or sampler_cfg.batch_size, grid=grid_device,
                      settings=settings, denoiser=denoiser)

    draw.grid, draw.settings = grid, settings
    return draw
