"""The sampler driver: σ-schedule, churn noise, one step object per interval, final denoise.

``integrate`` is the one driver (plain Python over JAX ops: it runs eagerly, under
``jax.disable_jit()`` or inside a caller's jit, e.g. once per block); ``sample`` and
``sample_from_noise`` are its jitted edges. The driver runs ``lax.scan`` over the N-1 grid
intervals with ``settings.step`` (``bitgen.sampling.steps``), then a final denoise at the terminal
σ; bits = 1[D_final > ½]. ``sampler_step`` takes its churn noise as an argument, so the same code
runs with keyed noise (``sample``: ``fold_in(key, i)`` per step) and with recorded noise
(``sample_from_noise``, used to replay the reference traces).

Denoiser contract: ``denoiser(params, x [B,S], sigma [B], x0_hat [B,S]) -> logits [B,S]``
(residual + matched filter, float32), called with ``cond=`` as well when a ``Cond`` is given; bind
the model config with ``functools.partial``. It is a static argument, so pass the same callable
object to reuse the compiled program. With a ``cond`` every state (x_init, x̂, the Heun predictor,
x') and every D hold the clamped bits at their clean value.

Guided sampling (``settings.guided``, a ``cond`` with ``clamp_mask`` and ``guidance``): the
denoiser is a guided one, ``denoiser(params, x, sigma, (x0_c, x0_u), cond=cond) ->
GuidedLogits`` (``bitgen.diffusion.denoiser.guided_denoise`` bound to a config); the steps move
x with the guided D (clamped) and the driver carries one self-conditioning state per branch,
each branch's own D (the conditional one clamped). Guidance is applied inside the denoiser, to
the network residual only (see ``guided_denoise``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bitgen.diffusion.cond import Cond, CondError
from bitgen.diffusion.denoiser import denoised_mean
from bitgen.sampling.settings import SamplerSettings
from bitgen.sampling.steps import StepOps, StepSchedule, churn, initial_state

Denoiser = Callable[..., jax.Array]


@struct.dataclass
class SampleResult:
    """bits uint8 [B,S]; D float32 [B,S] (final denoiser output); x float32 [B,S] (final state);
    nfe: denoiser calls made; trace: per-step arrays [N-1,B,S] when requested, else None."""

    bits: jax.Array
    D: jax.Array
    x: jax.Array
    trace: dict | None = None
    nfe: int = struct.field(pytree_node=False, default=0)


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
    """D = sigmoid(logits) [B,S] float32 at one σ (scalar, broadcast to the batch)."""
    sigma_b = jnp.broadcast_to(sigma, x.shape[:1])
    return denoised_mean(denoiser(params, x, sigma_b, x0_hat))


def step_ops(params, denoiser: Denoiser, cond: Cond | None = None, guided: bool = False) -> StepOps:
    """The denoise/clamp pair the steps call; ``cond=None`` adds no operation at all.

    ``guided``: ``denoiser`` is a guided one (module doc) and the SC state is a pair.
    """
    if cond is None:
        def plain(x, sigma, x0_hat):
            D = _denoise(denoiser, params, x, sigma, x0_hat)
            return D, D

        return StepOps(denoise=plain, impose=lambda x: x)
    conditioned = functools.partial(denoiser, cond=cond)
    if guided:
        def mixed(x, sigma, sc):
            out = conditioned(params, x, jnp.broadcast_to(sigma, x.shape[:1]), sc)
            return cond.clamp(denoised_mean(out.guided)), (
                cond.clamp(denoised_mean(out.conditional)), denoised_mean(out.unconditional))

        return StepOps(denoise=mixed, impose=cond.clamp)

    def clamped(x, sigma, x0_hat):
        D = cond.clamp(_denoise(conditioned, params, x, sigma, x0_hat))
        return D, D

    return StepOps(denoise=clamped, impose=cond.clamp)


def _check_guidance(settings: SamplerSettings, cond: Cond | None) -> None:
    guidance = cond is not None and cond.guidance is not None
    if guidance and not settings.guided:
        raise CondError("cond.guidance needs a guided sampler (two network calls per denoise); "
                        "build it with build_sampler(..., guided=True)")
    if settings.guided and not (guidance and cond.clamp_mask is not None):
        raise CondError("a guided sampler needs cond=Cond.clamped(mask, bits, guidance=w); "
                        "pass one or build the sampler with guided=False")


def sampler_step(params, carry: tuple[jax.Array, jax.Array], sched: StepSchedule,
                 noise: jax.Array, *, settings: SamplerSettings, denoiser: Denoiser,
                 cond: Cond | None = None):
    """One grid interval. carry = (x [B,S], SC state: x0_hat [B,S], or one per branch when
    guided); sched holds this step's scalars; noise [B,S] standard normal (used only if
    churned). Returns (new carry, trace dict)."""
    x, x0_hat = carry
    ops = step_ops(params, denoiser, cond, settings.guided)
    x_hat = ops.impose(churn(x, noise, sched, settings.s_noise))
    return settings.step(x_hat, x0_hat, sched, ops)


def integrate(params, x_init: jax.Array, grid: jax.Array, settings: SamplerSettings,
              denoiser: Denoiser, *, cond: Cond | None = None, key_churn: jax.Array | None = None,
              noise_churn: jax.Array | None = None, sigma_delta: jax.Array | None = None,
              return_trace: bool = False) -> SampleResult:
    """The driver: from x_init [B,S] at grid[0] down the descending σ-grid [N] to bits.

    Churn noise comes from ``noise_churn`` [N-1,B,S] when given, else from
    ``fold_in(key_churn, i)`` (and is not drawn at all when no step churns). ``sigma_delta``
    [N-1] replaces the computed churn std. ``cond`` clamps bits (x_init included) and, with
    ``settings.guided``, carries the guidance scale and ``guidance_noise``. Not jitted.
    """
    _check_guidance(settings, cond)
    sched = step_schedule(grid, settings, sigma_delta)
    steps = jnp.arange(settings.n_points - 1)
    ops = step_ops(params, denoiser, cond, settings.guided)
    x_init = ops.impose(jnp.asarray(x_init, jnp.float32))
    sc_init = jnp.zeros_like(x_init)
    if settings.guided:
        sc_init = (sc_init, jnp.zeros_like(x_init))

    def body(carry, inputs):
        i, sched_i, recorded = inputs
        if noise_churn is not None:
            noise = recorded
        elif settings.stochastic:
            noise = jax.random.normal(jax.random.fold_in(key_churn, i), x_init.shape, jnp.float32)
        else:
            noise = jnp.zeros_like(x_init)
        carry, trace = sampler_step(params, carry, sched_i, noise, settings=settings,
                                    denoiser=denoiser, cond=cond)
        return carry, (trace if return_trace else None)

    recorded = steps if noise_churn is None else jnp.asarray(noise_churn, jnp.float32)
    (x, x0_hat), trace = jax.lax.scan(body, (x_init, sc_init), (steps, sched, recorded))
    grid = jnp.asarray(grid, jnp.float32)
    D, _ = ops.denoise(x, ati_label(grid[-1], grid[-2], settings.ati_eta), x0_hat)
    return SampleResult(bits=(D > 0.5).astype(jnp.uint8), D=D, x=x, trace=trace, nfe=settings.nfe)


def _with_guidance_noise(settings: SamplerSettings, cond: Cond | None, noise_init) -> Cond | None:
    """A guided ``cond`` without ``guidance_noise`` takes the initial noise ε [B,S]: the
    unconditional branch then sees each clamped bit at bit + σ·ε, the path x_init would have
    followed there had the bit been generated (one ε per bit for the whole trajectory)."""
    if not settings.guided or cond is None or cond.guidance_noise is not None:
        return cond
    return cond.replace(guidance_noise=jnp.asarray(noise_init, jnp.float32))


@functools.partial(jax.jit, static_argnames=("batch", "settings", "denoiser", "return_trace"))
def sample(params, key: jax.Array, *, batch: int, grid: jax.Array, settings: SamplerSettings,
           denoiser: Denoiser, cond: Cond | None = None,
           return_trace: bool = False) -> SampleResult:
    """Draw ``batch`` samples of ``settings.seq_bits`` bits on the descending σ-grid [N].

    x_init = ½ + σ_0·ε with ε from ``split(key)[0]``; churn noise of step i from
    ``fold_in(split(key)[1], i)``. ``cond``: clamped bits [batch, seq_bits] (see ``Cond``).
    """
    if settings.seq_bits <= 0:
        raise ValueError("settings.seq_bits must be set (build_settings(..., seq_bits=S))")
    key_init, key_churn = jax.random.split(key)
    noise_init = jax.random.normal(key_init, (batch, settings.seq_bits), jnp.float32)
    cond = _with_guidance_noise(settings, cond, noise_init)
    return integrate(params, initial_state(noise_init, jnp.asarray(grid)[0]), grid, settings,
                     denoiser, cond=cond, key_churn=key_churn, return_trace=return_trace)


@functools.partial(jax.jit, static_argnames=("settings", "denoiser", "return_trace"))
def sample_from_noise(params, noise_init: jax.Array, noise_churn: jax.Array, *, grid: jax.Array,
                      settings: SamplerSettings, denoiser: Denoiser, cond: Cond | None = None,
                      sigma_delta: jax.Array | None = None,
                      return_trace: bool = False) -> SampleResult:
    """Replay mode: explicit noise_init [B,S] and churn noise [N-1,B,S] (ignored where γ_i = 0).

    ``sigma_delta`` [N-1] optionally replaces the computed churn std (the reference's float32
    sqrt is not correctly rounded, so bit-exact replays use its stored values).
    """
    cond = _with_guidance_noise(settings, cond, noise_init)
    return integrate(params, initial_state(noise_init, jnp.asarray(grid)[0]), grid, settings,
                     denoiser, cond=cond, noise_churn=noise_churn, sigma_delta=sigma_delta,
                     return_trace=return_trace)
