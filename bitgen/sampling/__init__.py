"""Samplers for bitstream diffusion: σ-grid + Euler/DDIM or Heun with EDM churn (spec §5).

Typical use::

    table = load_entropy_table("lm1b")
    draw = build_sampler(model_cfg, sampler_cfg, table, model_cfg.seq_bits)
    result = draw(params, jax.random.key(0))      # SampleResult(bits, D, x, trace, nfe)
    prompted = draw(params, key, cond=Cond.clamped(mask, bits))   # clamped bits kept as given
    guided = build_sampler(model_cfg, sampler_cfg, table, model_cfg.seq_bits, guided=True)
    steered = guided(params, key, cond=Cond.clamped(mask, bits, guidance=jnp.float32(2.0)))

Modules: ``steps`` (per-step arithmetic, ``EulerStep``/``HeunStep``, NFE accounting),
``samplers`` (the ``integrate`` driver and its jitted edges), ``settings`` (host-side resolution).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitgen.config import DiffusionConfig, ModelConfig, SamplerConfig
from bitgen.diffusion.cond import Cond
from bitgen.diffusion.denoiser import matched_filter_denoiser
from bitgen.diffusion.entropy_schedule import EntropyTable
from bitgen.sampling.samplers import (
    SampleResult,
    ati_label,
    integrate,
    sample,
    sample_from_noise,
    sampler_step,
    step_ops,
    step_schedule,
)
from bitgen.sampling.settings import (
    SamplerSettings,
    build_settings,
    churn_gammas,
    sampling_grid,
)
from bitgen.sampling.steps import (
    EulerStep,
    HeunStep,
    Step,
    StepOps,
    StepSchedule,
    calls_per_step,
    make_step,
    model_calls,
    nfe_to_grid_points,
)

__all__ = [
    "Cond", "EulerStep", "HeunStep", "SampleResult", "SamplerSettings", "Step", "StepOps",
    "StepSchedule", "ati_label", "build_sampler", "build_settings", "calls_per_step",
    "churn_gammas", "integrate", "make_step", "matched_filter_denoiser", "model_calls",
    "nfe_to_grid_points", "sample", "sample_from_noise", "sampler_step", "sampling_grid",
    "sdt_denoiser", "sdt_guided_denoiser", "step_ops", "step_schedule",
]


@functools.lru_cache(maxsize=None)
def sdt_denoiser(model_cfg: ModelConfig):
    """The SDT bound to ``model_cfg``, one object per config value.

    The denoiser is a static argument of the jitted samplers, compared by identity; a fresh
    ``functools.partial`` per call would recompile the sampler every time.
    """
    from bitgen.diffusion.denoiser import denoise

    return functools.partial(denoise, cfg=model_cfg)


@functools.lru_cache(maxsize=None)
def sdt_guided_denoiser(model_cfg: ModelConfig):
    """``guided_denoise`` with the SDT bound to ``model_cfg``, one object per config value."""
    from bitgen.diffusion.denoiser import guided_denoise

    return functools.partial(guided_denoise, cfg=model_cfg)


def build_sampler(model_cfg: ModelConfig, sampler_cfg: SamplerConfig, table: EntropyTable | None,
                  seq_bits: int, diffusion_cfg: DiffusionConfig | None = None, *,
                  denoiser=None, guided: bool = False):
    """Resolve grid and settings on the host; return
    ``draw(params, key, batch=None, *, cond=None) -> SampleResult``.

    ``denoiser`` defaults to the SDT (``bitgen.diffusion.denoiser.denoise`` bound to model_cfg,
    or ``guided_denoise`` when ``guided``). ``batch`` defaults to ``sampler_cfg.batch_size``;
    ``cond`` (a ``Cond`` with [batch, seq_bits] arrays) clamps known bits. ``guided``: classifier-
    free guidance; every draw then needs ``cond=Cond.clamped(mask, bits, guidance=w)`` and each
    denoise costs two network calls, which the grid size (from ``sampler_cfg.nfe``) and
    ``settings.nfe`` count. The sampler compiles once per (settings, batch, parameter shapes,
    denoiser, which ``cond`` fields are set): the default denoiser is one object per model config,
    so samplers built again with equal settings (another seed, another sweep visit) reuse the
    program.
    """
    if seq_bits != model_cfg.seq_bits:
        raise ValueError(f"seq_bits={seq_bits} does not match the model's "
                         f"seq_tokens*patch_size={model_cfg.seq_bits}")
    diffusion_cfg = diffusion_cfg or DiffusionConfig()
    grid = sampling_grid(sampler_cfg, table, diffusion_cfg, guided)
    settings = build_settings(sampler_cfg, grid, seq_bits=seq_bits, table=table,
                              diffusion_cfg=diffusion_cfg, guided=guided)
    if denoiser is None:
        denoiser = sdt_guided_denoiser(model_cfg) if guided else sdt_denoiser(model_cfg)
    grid_device = jnp.asarray(grid)

    def draw(params, key: jax.Array, batch: int | None = None, *,
             cond: Cond | None = None) -> SampleResult:
        return sample(params, key, batch=batch or sampler_cfg.batch_size, grid=grid_device,
                      settings=settings, denoiser=denoiser, cond=cond)

    draw.grid, draw.settings = grid, settings
    return draw
