"""Training loss for bit diffusion (spec §4.1, §4.2, §4.4).

VE forward process x_t = b + σε, one σ per sequence. Losses on the denoiser's logits:
``binary_sm`` = λ(σ)·(sigmoid(logit) - b)² (MSE of the posterior-mean denoiser, i.e. DSM up to
weighting) and ``binary_ce`` = λ(σ)·BCE-with-logits, with λ = 1/σ² + 1/σ_data² (``edm``) or 1
(``unit``). Self-conditioning follows the reference trainer: with probability p per sequence a
first pass (x0_hat=None quirk, dropout on, no gradient) supplies x0_hat = sigmoid(logits) for the
selected rows and 0 elsewhere. All loss arithmetic is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitgen.config import DiffusionConfig, ModelConfig, check_bit_constants
from bitgen.diffusion.bit_constants import SIGMA_DATA
from bitgen.diffusion.denoiser import Params, denoise, denoised_mean

Array = jax.Array


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
) -> tuple[Array, dict[str, Array]]:
    """Scalar loss (mean over batch and bits) and per-sequence diagnostics.

    logits [B, S], bits [B, S] in {0,1}, sigma [B]. aux: ``loss_per_sample`` [B] (weighted, mean
    over bits; its batch mean is the loss) and ``mse_per_sample`` [B] = mean_bits (D - b)², the
    unweighted metric the entropy-rate schedule consumes (independent of loss_type/weighting).
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
    aux = {"loss_per_sample": jnp.mean(weighted, axis=1),
           "mse_per_sample": jnp.mean(squared_error, axis=1)}
    return jnp.mean(weighted), aux


def self_conditioning_input(
    params: Params,
    x_t: Array,
    sigma: Array,
    sc_mask: Array,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    train: bool = True,
) -> Array:
    """x0_hat [B, S] for the main pass: sigmoid of a gradient-free bootstrap pass on rows where
    ``sc_mask`` [B] is True, 0 elsewhere. The bootstrap pass feeds x0_hat=None, as the reference
    trainer does (un-centred zero SC channel)."""
    logits = denoise(params, x_t, sigma, None, cfg=cfg, key=key, train=train)
    estimate = denoised_mean(jax.lax.stop_gradient(logits))
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
) -> tuple[Array, dict[str, Array]]:
    """Loss of one batch: noise the bits, self-condition, denoise, weight.

    bits [B, S] uint8 in {0,1}; sigma [B] float32 > 0; key: typed PRNG key for ε, the SC row
    draw and dropout. ``sc_mask`` [B] bool and ``noise`` [B, S] override the random draws (replay
    and parity). Returns (scalar loss, aux) with aux = ``loss_per_sample`` [B], ``mse_per_sample``
    [B] and ``sc_mask`` [B]. Pure and jit-able (configs static). The EDM weight uses
    ``SIGMA_DATA`` (``diffusion_cfg.sigma_data`` must equal it, ``check_bit_constants``).
    """
    check_bit_constants(diffusion_cfg)
    if bits.ndim != 2 or sigma.shape != bits.shape[:1]:
        raise ValueError(f"need bits [batch, bits] and sigma [batch]; got {bits.shape} and {sigma.shape}")
    key_noise, key_sc, key_bootstrap, key_main = jax.random.split(key, 4)
    sigma = sigma.astype(jnp.float32)
    if noise is None:
        noise = jax.random.normal(key_noise, bits.shape, jnp.float32)
    x_t = sigma[:, None] * noise.astype(jnp.float32) + bits.astype(jnp.float32)
    if sc_mask is None and diffusion_cfg.self_condition_prob <= 0.0:
        # No self-conditioning: skip the bootstrap pass entirely (it is a full forward).
        sc_mask = jnp.zeros(sigma.shape, bool)
        x0_hat = jnp.zeros_like(x_t)
    else:
        if sc_mask is None:
            sc_mask = jax.random.uniform(key_sc, sigma.shape) < diffusion_cfg.self_condition_prob
        x0_hat = self_conditioning_input(params, x_t, sigma, sc_mask, cfg=model_cfg,
                                         key=key_bootstrap, train=train)
    logits = denoise(params, x_t, sigma, x0_hat, cfg=model_cfg, key=key_main, train=train)
    loss, aux = loss_from_logits(logits, bits, sigma, loss_type=diffusion_cfg.loss_type,
                                 weighting=diffusion_cfg.loss_weighting,
                                 sigma_data=SIGMA_DATA)
    return loss, {**aux, "sc_mask": sc_mask}
