"""The denoiser contract: SDT residual + matched filter -> per-bit logits (spec §3).

For a bit b in {0,1} observed as x = b + σε the log-likelihood ratio is (x - ½)/σ², so the
independent-bit posterior is sigmoid((x - ½)/σ²). The network adds the contextual log-prior odds:

    logit = f_θ(x, σ, x0_hat) + clip((x - ½)/max(σ², 1e-12), ±clip)
    D     = sigmoid(logit) = E[b | x]           score = (D - x)/σ²

Everything downstream (loss, samplers, evaluation) calls ``denoise``; nothing calls the network
directly. Logits, D and the matched filter are always float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitgen.config import ModelConfig
from bitgen.nn.sdt import DATA_CENTER, SDT

Array = jax.Array
Params = Mapping[str, Any]

SIGMA2_FLOOR = 1e-12  # keeps the matched filter finite at σ = 0


def divide_rows(values: Array, per_row: Array) -> Array:
    """values [B, S] / per_row [B] with true IEEE division.

    XLA rewrites ``a / broadcast(b)`` as ``a * broadcast(1/b)``, which is off by an ulp; the
    barrier keeps the division so pure-arithmetic chains replay the reference bit for bit.
    """
    denominator = jax.lax.optimization_barrier(jnp.broadcast_to(per_row[:, None], values.shape))
    return values / denominator


def matched_filter_llr(x: Array, sigma: Array, clip: float = 30.0) -> Array:
    """Clipped per-bit log-likelihood ratio ``clip((x - ½)/max(σ², 1e-12), ±clip)``.

    x: [B, S]; sigma: [B] (one σ per sequence). Returns [B, S] float32.
    """
    sigma2 = jnp.maximum(jnp.square(sigma.astype(jnp.float32)), SIGMA2_FLOOR)
    return jnp.clip(divide_rows(x.astype(jnp.float32) - DATA_CENTER, sigma2), -clip, clip)


def combine_logits(f_theta: Array, x_t: Array, sigma: Array, *, cfg: ModelConfig) -> Array:
    """Turn the raw residual f_θ [B, S] into logits [B, S] float32 per ``cfg.logit_scaling``.

    ``matched_filter_residual``: f_θ + mf; ``none``: f_θ; ``matched_filter_only``: mf;
    ``inv_sigma2``: f_θ/σ² (σ² floored at the float32 tiny).
    """
    f_theta = f_theta.astype(jnp.float32)
    mode = cfg.logit_scaling
    if mode == "matched_filter_residual":
        return f_theta + matched_filter_llr(x_t, sigma, cfg.mf_clip)
    if mode == "matched_filter_only":
        return matched_filter_llr(x_t, sigma, cfg.mf_clip)
    if mode == "none":
        return f_theta
    if mode == "inv_sigma2":
        sigma2 = jnp.maximum(jnp.square(sigma.astype(jnp.float32)), jnp.finfo(jnp.float32).tiny)
        return divide_rows(f_theta, sigma2)
    raise ValueError(f"model.logit_scaling={mode!r} is not one of matched_filter_residual, none, "
                     "matched_filter_only, inv_sigma2")


def denoised_mean(logits: Array) -> Array:
    """D = sigmoid(logits) in float32: the posterior mean E[b | x_t] per bit."""
    return jax.nn.sigmoid(logits.astype(jnp.float32))


def score(denoised: Array, x_t: Array, sigma: Array) -> Array:
    """VE score ∇ log p(x_t) = (D - x_t)/σ², [B, S] float32."""
    return divide_rows(denoised - x_t.astype(jnp.float32), jnp.square(sigma.astype(jnp.float32)))


def _check_inputs(x_t: Array, sigma: Array, x0_hat: Array | None, cfg: ModelConfig) -> None:
    if x_t.ndim != 2:
        raise ValueError(f"x_t must be [batch, bits], got shape {x_t.shape}")
    if sigma.shape != x_t.shape[:1]:
        raise ValueError(f"sigma must be [batch]={x_t.shape[:1]} (one σ per sequence), got {sigma.shape}")
    if x_t.shape[1] % cfg.patch_size:
        raise ValueError(f"x_t has {x_t.shape[1]} bits per sequence, not a multiple of "
                         f"model.patch_size={cfg.patch_size}; pad or fix the bit width")
    if x0_hat is not None and x0_hat.shape != x_t.shape:
        raise ValueError(f"x0_hat shape {x0_hat.shape} must equal x_t shape {x_t.shape}")


def residual_logits(
    params: Params,
    x_t: Array,
    sigma: Array,
    x0_hat: Array | None,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    train: bool = False,
    capture_intermediates: bool = False,
) -> Array | tuple[Array, dict]:
    """The network alone: f_θ [B, S] float32 (plus the sown intermediates when asked).

    x0_hat None = the reference's SC-bootstrap quirk (un-centred zero SC channel); pass
    ``jnp.zeros_like(x_t)`` for "no self-conditioning". ``key`` drives dropout and is required when
    ``train`` and ``cfg.dropout > 0``.
    """
    _check_inputs(x_t, sigma, x0_hat, cfg)
    rngs = {}
    if train and cfg.dropout > 0.0:
        if key is None:
            raise ValueError("train=True with model.dropout > 0 needs a dropout key (key=...)")
        rngs["dropout"] = key
    model = SDT(cfg, train=train)
    variables = {"params": params}
    if capture_intermediates:
        f_theta, state = model.apply(variables, x_t, sigma, x0_hat, rngs=rngs,
                                     mutable=["intermediates"])
        return f_theta, state["intermediates"]
    return model.apply(variables, x_t, sigma, x0_hat, rngs=rngs)


def denoise(
    params: Params,
    x_t: Array,
    sigma: Array,
    x0_hat: Array | None,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    train: bool = False,
) -> Array:
    """Per-bit logits [B, S] float32 (residual + matched filter per ``cfg.logit_scaling``).

    x_t: [B, S] noisy bits; sigma: [B]; x0_hat: [B, S] self-conditioning estimate in [0, 1]
    (zeros = none) or None (the reference's bootstrap quirk, see ``residual_logits``).
    """
    if cfg.logit_scaling == "matched_filter_only":
        _check_inputs(x_t, sigma, x0_hat, cfg)
        return matched_filter_llr(x_t, sigma, cfg.mf_clip)
    f_theta = residual_logits(params, x_t, sigma, x0_hat, cfg=cfg, key=key, train=train)
    return combine_logits(f_theta, x_t, sigma, cfg=cfg)


def _init_boxed(key: jax.Array, cfg: ModelConfig):
    x = jnp.full((1, cfg.seq_bits), 0.5, jnp.float32)
    sigma = jnp.ones((1,), jnp.float32)
    return SDT(cfg).init({"params": key}, x, sigma, jnp.zeros_like(x))["params"]


_init_boxed_jit = jax.jit(_init_boxed, static_argnames="cfg")


def init_params(key: jax.Array, cfg: ModelConfig) -> dict:
    """Fresh float32 parameters (plain arrays) with the reference initialisers.

    At init every adaLN-Zero gate is 0, so f_θ ≡ 0 and the denoiser is the pure matched filter.
    """
    return nn.unbox(_init_boxed_jit(key, cfg))


def param_shapes(cfg: ModelConfig) -> dict:
    """Parameter pytree of ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
    return nn.unbox(jax.eval_shape(lambda k: _init_boxed(k, cfg), jax.random.key(0)))


def count_params(cfg: ModelConfig) -> int:
    """Number of trainable parameters, counted from shapes only."""
    return sum(leaf.size for leaf in jax.tree.leaves(param_shapes(cfg)))


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Pytree matching ``init_params`` whose leaves are ``PartitionSpec``s of logical axis names.

    Map them to mesh axes with one rules table (``flax.linen.logical_to_mesh_sharding``).
    """
    boxed = jax.eval_shape(lambda k: _init_boxed(k, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)
