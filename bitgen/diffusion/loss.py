"""Training loss for bit diffusion (spec §4.1, §4.2, §4.4).

VE forward process x_t = b + σε, one σ per sequence. Losses on the denoiser's logits:
``binary_sm`` = λ(σ)·(sigmoid(logit) - b)² (MSE of the posterior-mean denoiser, i.e. DSM up to
weighting) and ``binary_ce`` = λ(σ)·BCE-with-logits, with λ = 1/σ² + 1/σ_data² (``edm``) or 1
(``unit``). Self-conditioning follows the reference trainer: with probability p per sequence a
first pass (x0_hat=None quirk, dropout on, no gradient) supplies x0_hat = sigmoid(logits) for the
selected rows and 0 elsewhere. All loss arithmetic is float32.

Conditional training (``cond_mask`` [B,S] bool, True = known bit): known bits stay clean in x_t
at every σ (as the samplers clamp them), the first SC pass sees that same x_t and its estimate
carries the known bits at their clean value (as the samplers' clamped D does), and only target
bits are scored: each row's loss and MSE are means over its target bits. With probability
``diffusion.cond_dropout`` a row's conditioning is dropped: it has no known bits, so it is noised
and scored whole, and the same model learns the unconditional distribution guidance needs
(``bitgen.diffusion.denoiser.guided_denoise``). Without a mask every operation is the unmasked one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitgen.config import DiffusionConfig, ModelConfig, check_bit_constants
from bitgen.diffusion.bit_constants import SIGMA_DATA
from bitgen.diffusion.cond import CondError
from bitgen.diffusion.denoiser import Params, denoise, denoised_mean

Array = jax.Array
COND_DROPOUT_STREAM = 0x636F6E64  # fold_in data of the condition-dropout draw ("cond")


def loss_weight(sigma: Array, *, weighting: str, sigma_data: float) -> Array:
    """Per-sequence weight λ(σ) [B] float32: ``edm`` (σ² + σ_d²)/(σ²·σ_d²) or ``unit`` 1."""
    sigma2 = jnp.square(sigma.astype(jnp.float32))
    if weighting == "edm":
        sd2 = sigma_data**2
        return (sigma2 + sd2) / (sigma2 * sd2)
    if weighting == "unit":
        return jnp.ones_like(sigma2)
    raise ValueError(f"diffusion.loss_weighting={weighting!r} is not one of edm, unit")


def loss_from_logits(
    logits: Array,
    bits: Array,
    sigma: Array,
    *,
    loss_type: str,
    weighting: str,
    sigma_data: float,
    target_mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Scalar loss (mean over batch and bits) and per-sequence diagnostics.

    logits [B, S], bits [B, S] in {0,1}, sigma [B]. aux: ``loss_per_sample`` [B] (weighted, mean
    over bits; its batch mean is the loss) and ``mse_per_sample`` [B] = mean_bits (D - b)², the
    unweighted metric the entropy-rate schedule consumes (independent of loss_type/weighting).
    ``target_mask`` [B, S] bool (None = every bit): the row means run over target bits only; a
    row without target bits has loss 0 and MSE NaN (the schedule's table drops non-finite rows).
    The batch mean still divides by B.
    """
    target = bits.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    squared_error = jnp.square(denoised_mean(logits) - target)
    if loss_type == "binary_sm":
        per_bit = squared_error
    elif loss_type == "binary_ce":
        # BCE with logits, stable for large |logit|: (1 - b)·x + softplus(-x).
        per_bit = (1.0 - target) * logits + jax.nn.softplus(-logits)
    else:
        raise ValueError(f"diffusion.loss_type={loss_type!r} is not one of binary_sm, binary_ce")
    weighted = loss_weight(sigma, weighting=weighting, sigma_data=sigma_data)[:, None] * per_bit
    if target_mask is None:
        aux = {"loss_per_sample": jnp.mean(weighted, axis=1),
               "mse_per_sample": jnp.mean(squared_error, axis=1)}
        return jnp.mean(weighted), aux
    target_mask = jnp.asarray(target_mask, bool)
    count = jnp.sum(target_mask, axis=1).astype(jnp.float32)
    denominator = jnp.maximum(count, 1.0)  # an all-known row sums to 0: no division by zero
    # where (not a product with the mask): the gradient at a known bit is exactly 0.
    loss_per_sample = jnp.sum(jnp.where(target_mask, weighted, 0.0), axis=1) / denominator
    mse_sum = jnp.sum(jnp.where(target_mask, squared_error, 0.0), axis=1)
    aux = {"loss_per_sample": loss_per_sample,
           "mse_per_sample": jnp.where(count > 0, mse_sum / denominator, jnp.nan)}
    return jnp.mean(loss_per_sample), aux


def kept_conditioning(cond_mask: Array, key: jax.Array, p_uncond: float) -> Array:
    """cond_mask [B, S] with each row's known bits dropped (all False) with probability
    ``p_uncond``: condition dropout for classifier-free guidance. p_uncond = 0 draws nothing."""
    cond_mask = jnp.asarray(cond_mask, bool)
    if p_uncond <= 0.0:
        return cond_mask
    dropped = jax.random.uniform(key, cond_mask.shape[:1]) < p_uncond
    return cond_mask & ~dropped[:, None]


def self_conditioning_input(
    params: Params,
    x_t: Array,
    sigma: Array,
    sc_mask: Array,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    train: bool = True,
    known: tuple[Array, Array] | None = None,
) -> Array:
    """x0_hat [B, S] for the main pass: sigmoid of a gradient-free bootstrap pass on rows where
    ``sc_mask`` [B] is True, 0 elsewhere. The bootstrap pass feeds x0_hat=None, as the reference
    trainer does (un-centred zero SC channel). ``known`` = (cond_mask [B,S], bits [B,S]): the
    estimate holds known bits at their clean value, as the samplers' clamped D does."""
    logits = denoise(params, x_t, sigma, None, cfg=cfg, key=key, train=train)
    estimate = denoised_mean(jax.lax.stop_gradient(logits))
    if known is not None:
        estimate = jnp.where(known[0], known[1].astype(jnp.float32), estimate)
    return jnp.where(sc_mask[:, None], estimate, 0.0)


def diffusion_loss(
    params: Params,
    bits: Array,
    sigma: Array,
    key: jax.Array,
    *,
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    train: bool = True,
    sc_mask: Array | None = None,
    noise: Array | None = None,
    cond_mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Loss of one batch: noise the bits, self-condition, denoise, weight.

    bits [B, S] uint8 in {0,1}; sigma [B] float32 > 0; key: typed PRNG key for ε, the SC row
    draw and dropout. ``sc_mask`` [B] bool and ``noise`` [B, S] override the random draws (replay
    and parity). ``cond_mask`` [B, S] bool (True = known bit, None = unconditional): known bits
    stay clean and are not scored, rows are dropped with prob ``diffusion_cfg.cond_dropout`` (the
    module docstring); the draw uses ``fold_in(key, COND_DROPOUT_STREAM)``, so the other draws
    are the unmasked ones. Returns (scalar loss, aux) with aux = ``loss_per_sample`` [B],
    ``mse_per_sample`` [B] (target bits only), ``sc_mask`` [B] and, with a mask, ``cond_mask``
    [B, S] after dropout. Pure and jit-able (configs static). The EDM weight uses ``SIGMA_DATA``
    (``diffusion_cfg.sigma_data`` must equal it, ``check_bit_constants``).
    """
    check_bit_constants(diffusion_cfg)
    if bits.ndim != 2 or sigma.shape != bits.shape[:1]:
        raise ValueError(f"need bits [batch, bits] and sigma [batch]; got {bits.shape} and {sigma.shape}")
    if cond_mask is not None and cond_mask.shape != bits.shape:
        raise CondError(f"cond_mask {cond_mask.shape} must match bits {bits.shape}; build both "
                        "from the same example layout")
    key_noise, key_sc, key_bootstrap, key_main = jax.random.split(key, 4)
    sigma = sigma.astype(jnp.float32)
    if noise is None:
        noise = jax.random.normal(key_noise, bits.shape, jnp.float32)
    x_t = sigma[:, None] * noise.astype(jnp.float32) + bits.astype(jnp.float32)
    known = None
    if cond_mask is not None:
        cond_mask = kept_conditioning(cond_mask, jax.random.fold_in(key, COND_DROPOUT_STREAM),
                                      diffusion_cfg.cond_dropout)
        x_t = jnp.where(cond_mask, bits.astype(jnp.float32), x_t)
        known = (cond_mask, bits)
    if sc_mask is None and diffusion_cfg.self_condition_prob <= 0.0:
        # No self-conditioning: skip the bootstrap pass entirely (it is a full forward).
        sc_mask = jnp.zeros(sigma.shape, bool)
        x0_hat = jnp.zeros_like(x_t)
    else:
        if sc_mask is None:
            sc_mask = jax.random.uniform(key_sc, sigma.shape) < diffusion_cfg.self_condition_prob
        x0_hat = self_conditioning_input(params, x_t, sigma, sc_mask, cfg=model_cfg,
                                         key=key_bootstrap, train=train, known=known)
    logits = denoise(params, x_t, sigma, x0_hat, cfg=model_cfg, key=key_main, train=train)
    loss, aux = loss_from_logits(logits, bits, sigma, loss_type=diffusion_cfg.loss_type,
                                 weighting=diffusion_cfg.loss_weighting,
                                 sigma_data=SIGMA_DATA,
                                 target_mask=None if cond_mask is None else ~cond_mask)
    if cond_mask is not None:
        aux["cond_mask"] = cond_mask
    return loss, {**aux, "sc_mask": sc_mask}
