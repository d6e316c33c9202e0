"""Euler/DDIM and Heun samplers with EDM churn, ATI and self-conditioning (spec §5.2-5.5).

One jitted program per sampler: ``lax.scan`` over the N-1 grid intervals, then a final denoise at
the terminal σ; bits = 1[D_final > ½]. The per-step function ``sampler_step`` takes its churn
noise as an argument, so the same code runs with keyed noise (``sample``: ``fold_in(key, i)`` per
step) and with recorded noise (``sample_from_noise``, used to replay the reference traces).

Denoiser contract: ``denoiser(params, x [B,S], sigma [B], x0_hat [B,S]) -> logits [B,S]``
(residual + matched filter, float32); bind the model config with ``functools.partial``. It is a
static argument, so pass the same callable object to reuse the compiled program.

Arithmetic follows the reference op by op in float32 (σ̂ = σ_i·float32(1+γ_i);
x̂ = x + δ·(ε·S_noise) with δ = sqrt(σ̂² − σ_i²); d = (−σ̂)·((D − x̂)/(σ̂·σ̂)); x' = x̂ + (σ_{i+1} − σ̂)·d),
which makes the update chain bit-exact given the same logits and δ. Every product is passed
through ``_rounded`` before it is added, so XLA can neither contract it into a fused multiply-add
nor reassociate it (see docs/parity.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bitgen.sampling.settings import SamplerSettings

Denoiser = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


@struct.dataclass
class SampleResult:
    """bits uint8 [B,S]; D float32 [B,S] (final denoiser output); x float32 [B,S] (final state);
    nfe: denoiser calls made; trace: per-step arrays [N-1,B,S] when requested, else None."""

    bits: jax.Array
    D: jax.Array
    x: jax.Array
    trace: dict | None = None
    nfe: int = struct.field(pytree_node=False, default=0)


class StepSchedule(NamedTuple):
    """Per-interval constants [N-1] (float32 unless noted)."""

    sigma: jax.Array  # σ_i
    sigma_next: jax.Array  # σ_{i+1}
    sigma_hat: jax.Array  # σ_i·(1+γ_i)
    sigma_delta: jax.Array  # churn std sqrt(σ̂² − σ_i²), 0 where not churned
    label: jax.Array  # σ fed to the network for the first call (ATI-shifted σ̂)
    label_next: jax.Array  # σ fed to the Heun corrector / SC refresh (ATI-shifted σ_{i+1})
    churned: jax.Array  # bool: γ_i > 0


def ati_label(sigma: jax.Array, sigma_noisier: jax.Array, eta: float) -> jax.Array:
    """ATI label shift: exp(ln σ + η(ln σ_noisier − ln σ)) clamped to [σ, σ_noisier].

    Unchanged when η = 0 or σ_noisier ≤ σ (e.g. the first step, or after churn overshoots).
    """
    if eta <= 0:
        return sigma
    log_s = jnp.log(jnp.maximum(sigma, 1e-20))
    log_n = jnp.log(jnp.maximum(sigma_noisier, 1e-20))
    shifted = jnp.minimum(jnp.maximum(jnp.exp(log_s + eta * (log_n - log_s)), sigma), sigma_noisier)
    return jnp.where(sigma_noisier <= sigma, sigma, shifted)


def step_schedule(grid: jax.Array, settings: SamplerSettings,
                  sigma_delta: jax.Array | None = None) -> StepSchedule:
    """Per-step σ̂, δ and network labels from the grid [N]; ``sigma_delta`` overrides δ (replay)."""
    grid = jnp.asarray(grid, jnp.float32)
    if grid.shape != (settings.n_points,):
        raise ValueError(f"grid has shape {grid.shape} but settings were built for "
                         f"{settings.n_points} points; rebuild the settings for this grid")
    gammas = np.asarray(settings.gammas, np.float64)
    churned = jnp.asarray(gammas > 0)
    # The reference casts (1 + γ) to float32 before multiplying.
    factor = jnp.asarray((1.0 + gammas).astype(np.float32))
    sigma, sigma_next = grid[:-1], grid[1:]
    sigma_hat = jnp.where(churned, sigma * factor, sigma)
    if sigma_delta is None:
        sigma_delta = jnp.sqrt(jnp.maximum(sigma_hat * sigma_hat - sigma * sigma, 0.0))
    sigma_delta = jnp.where(churned, jnp.asarray(sigma_delta, jnp.float32), 0.0)
    sigma_prev = jnp.concatenate([sigma_hat[:1], sigma[:-1]])  # step 0 has no noisier level
    return StepSchedule(
        sigma=sigma, sigma_next=sigma_next, sigma_hat=sigma_hat, sigma_delta=sigma_delta,
        label=ati_label(sigma_hat, sigma_prev, settings.ati_eta),
        label_next=ati_label(sigma_next, sigma_hat, settings.ati_eta), churned=churned)


def _denoise(denoiser: Denoiser, params, x, sigma, x0_hat) -> jax.Array:
    sigma_b = jnp.broadcast_to(sigma, x.shape[:1])
    return jax.nn.sigmoid(denoiser(params, x, sigma_b, x0_hat).astype(jnp.float32))


def _rounded(v: jax.Array) -> jax.Array:
    """v as its own rounded float32 value (NaN kept NaN).

    XLA on CPU contracts ``a + b*c`` into one fused multiply-add and reorders products of scalars;
    optimization barriers are stripped before code generation. The select makes the operand of the
    next add (or multiply) a select rather than a product, which neither XLA nor LLVM fuses or
    reorders, so ``x + _rounded(h*d)`` rounds twice, as the reference does.
    """
    return jnp.where(jnp.isnan(v), jnp.float32(jnp.nan), v)


def _direction(D, x, sigma):
    """d = −σ·score with score = (D − x)/σ², in the reference's operation order."""
    # XLA rewrites division by a broadcast scalar into multiplication by its reciprocal, which is
    # off by an ulp; the barrier keeps a true division so replays of the reference stay bit-exact.
    sigma2 = jax.lax.optimization_barrier(jnp.broadcast_to(sigma * sigma, x.shape))
    return _rounded((-sigma) * ((D - x) / sigma2))  # Heun adds two directions: no FMA there either


def sampler_step(params, carry: tuple[jax.Array, jax.Array], sched: StepSchedule,
                 noise: jax.Array, *, settings: SamplerSettings, denoiser: Denoiser):
    """One grid interval. carry = (x [B,S], x0_hat [B,S]); sched holds this step's scalars;
    noise [B,S] standard normal (used only if churned). Returns (new carry, trace dict)."""
    x, x0_hat = carry
    churn = sched.sigma_delta * _rounded(noise * jnp.float32(settings.s_noise))
    x_hat = jnp.where(sched.churned, x + _rounded(churn), x)
    D = _denoise(denoiser, params, x_hat, sched.label, x0_hat)
    d = _direction(D, x_hat, sched.sigma_hat)
    h = sched.sigma_next - sched.sigma_hat
    trace = {"x_hat": x_hat, "D": D, "x0_hat_in": x0_hat}
    if settings.method == "heun":
        x_pred = x_hat + _rounded(h * d)
        D2 = _denoise(denoiser, params, x_pred, sched.label_next, D)
        x_new = x_hat + _rounded((0.5 * h) * (d + _direction(D2, x_pred, sched.sigma_next)))
        trace.update(x_pred=x_pred, D2=D2)
    else:
        x_new = x_hat + _rounded(h * d)
    x0_new = D
    if settings.sc_mode == "refined":
        x0_new = _denoise(denoiser, params, x_new, sched.label_next, D)
    trace["x"] = x_new
    return (x_new, x0_new), trace


def _integrate(params, x_init, grid, settings: SamplerSettings, denoiser: Denoiser, *,
               key_churn=None, noise_churn=None, sigma_delta=None, return_trace=False):
    """Shared driver: scan over the N-1 intervals, then the final denoise at the terminal σ.

    Churn noise comes from ``noise_churn`` [N-1,B,S] when given, else from
    ``fold_in(key_churn, i)`` (and is not drawn at all when no step churns).
    """
    sched = step_schedule(grid, settings, sigma_delta)
    steps = jnp.arange(settings.n_points - 1)

    def body(carry, inputs):
        i, sched_i, recorded = inputs
        if noise_churn is not None:
            noise = recorded
        elif settings.stochastic:
            noise = jax.random.normal(jax.random.fold_in(key_churn, i), x_init.shape, jnp.float32)
        else:
            noise = jnp.zeros_like(x_init)
        carry, trace = sampler_step(params, carry, sched_i, noise, settings=settings,
                                    denoiser=denoiser)
        return carry, (trace if return_trace else None)

    recorded = steps if noise_churn is None else jnp.asarray(noise_churn, jnp.float32)
    (x, x0_hat), trace = jax.lax.scan(body, (x_init, jnp.zeros_like(x_init)),
                                      (steps, sched, recorded))
    grid = jnp.asarray(grid, jnp.float32)
    final_label = ati_label(grid[-1], grid[-2], settings.ati_eta)
    D = _denoise(denoiser, params, x, final_label, x0_hat)
    return SampleResult(bits=(D > 0.5).astype(jnp.uint8), D=D, x=x, trace=trace, nfe=settings.nfe)


@functools.partial(jax.jit, static_argnames=("batch", "settings", "denoiser", "return_trace"))
def sample(params, key: jax.Array, *, batch: int, grid: jax.Array, settings: SamplerSettings,
           denoiser: Denoiser, return_trace: bool = False) -> SampleResult:
    """Draw ``batch`` samples of ``settings.seq_bits`` bits on the descending σ-grid [N].

    x_init = ½ + σ_0·ε with ε from ``split(key)[0]``; churn noise of step i from
    ``fold_in(split(key)[1], i)``.
    """
    if settings.seq_bits <= 0:
        raise ValueError("settings.seq_bits must be set (build_settings(..., seq_bits=S))")
    key_init, key_churn = jax.random.split(key)
    noise_init = jax.random.normal(key_init, (batch, settings.seq_bits), jnp.float32)
    return _integrate(params, _initial_state(noise_init, grid, settings), grid, settings, denoiser,
                      key_churn=key_churn, return_trace=return_trace)


@functools.partial(jax.jit, static_argnames=("settings", "denoiser", "return_trace"))
def sample_from_noise(params, noise_init: jax.Array, noise_churn: jax.Array, *, grid: jax.Array,
                      settings: SamplerSettings, denoiser: Denoiser,
                      sigma_delta: jax.Array | None = None,
                      return_trace: bool = False) -> SampleResult:
    """Replay mode: explicit noise_init [B,S] and churn noise [N-1,B,S] (ignored where γ_i = 0).

    ``sigma_delta`` [N-1] optionally replaces the computed churn std (the reference's float32
    sqrt is not correctly rounded, so bit-exact replays use its stored values).
    """
    return _integrate(params, _initial_state(noise_init, grid, settings), grid, settings, denoiser,
                      noise_churn=noise_churn, sigma_delta=sigma_delta, return_trace=return_trace)


def _initial_state(noise, grid, settings: SamplerSettings):
    # x_T = ε·σ_0 + ½: the prior is centred on the data centre, not on 0.
    scaled = _rounded(jnp.asarray(noise, jnp.float32) * jnp.asarray(grid, jnp.float32)[0])
    return scaled + jnp.float32(settings.data_center)


def matched_filter_denoiser(params, x, sigma, x0_hat, *, clip: float = 30.0, center: float = 0.5):
    """The analytic independent-bit posterior logit clip((x−½)/σ², ±clip): the SDT at init."""
    del params, x0_hat
    s2 = jnp.maximum(sigma * sigma, 1e-12)[:, None]
    return jnp.clip((x - center) / s2, -clip, clip)
