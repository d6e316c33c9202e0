"""The denoiser contract: SDT residual + matched filter -> per-bit logits (spec §3).

For a bit b in {0,1} observed as x = b + σε the log-likelihood ratio is (x - ½)/σ², so the
independent-bit posterior is sigmoid((x - ½)/σ²). The network adds the contextual log-prior odds:

    logit = f_θ(x, σ, x0_hat) + clip((x - ½)/max(σ², 1e-12), ±clip)
    D     = sigmoid(logit) = E[b | x]           score = (D - x)/σ²

Everything downstream (loss, samplers, evaluation) calls ``denoise``; nothing calls the network
directly. The network is a parameter (``network``, default the SDT), so another family's network
can sit behind the same matched-filter contract; ``cond`` (``bitgen.diffusion.cond.Cond``) carries
what it may condition on. Logits, D and the matched filter are always float32. Classifier-free
guidance over clamped bits is ``guided_denoise``: it mixes the two branches' residuals f_θ and
adds the matched filter once, unamplified.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitgen.config import ModelConfig
from bitgen.diffusion.bit_constants import DATA_CENTER
from bitgen.diffusion.cond import Cond, CondError
from bitgen.nn.sdt import SDT

Array = jax.Array
Params = Mapping[str, Any]
# A network: ``network(cfg, train=...)`` is a Flax module whose ``__call__(x_t [B,S], sigma [B],
# x0_hat [B,S] | None)`` returns the residual f_θ [B,S] (plus ``embedding=`` if it conditions on
# one). The SDT class is one.
Network = Callable[..., nn.Module]

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
    """VE score ∇ log p(x_t) = (D - x_t)/σ², [B, S] float32; sigma [B].

    The samplers' direction d = -σ·score is built on this (``bitgen.sampling.steps.direction``):
    the true division (``divide_rows``) is the reference's operation order.
    """
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


def _network_inputs(model: nn.Module, cond: Cond | None) -> dict:
    """Keyword inputs the network gets from ``cond``: its ``embedding``, if any.

    Clamped bits reach the network through x_t itself (they sit at their clean value).
    """
    if cond is None or cond.embedding is None:
        return {}
    if "embedding" not in inspect.signature(type(model).__call__).parameters:
        raise CondError(f"cond.embedding was given but {type(model).__name__} takes no embedding; "
                        "drop it or use a network that conditions on one")
    return {"embedding": cond.embedding}


def residual_logits(
    params: Params,
    x_t: Array,
    sigma: Array,
    x0_hat: Array | None,
    *,
    cfg: ModelConfig,
    cond: Cond | None = None,
    key: jax.Array | None = None,
    train: bool = False,
    capture_intermediates: bool = False,
    network: Network = SDT,
) -> Array | tuple[Array, dict]:
    """The network alone: f_θ [B, S] float32 (plus the sown intermediates when asked).

    x0_hat None = the reference's SC-bootstrap quirk (un-centred zero SC channel); pass
    ``jnp.zeros_like(x_t)`` for "no self-conditioning". ``key`` drives dropout and is required when
    ``train`` and ``cfg.dropout > 0``. ``network(cfg, train=train)`` builds the module (see
    ``Network``); ``cond.embedding`` is passed to it as ``embedding=``.
    """
    _check_inputs(x_t, sigma, x0_hat, cfg)
    if cond is not None and cond.guidance is not None:
        raise CondError("cond.guidance is applied by guided_denoise (samplers built with "
                        "guided=True call it); pass denoise a Cond without guidance")
    rngs = {}
    if train and cfg.dropout > 0.0:
        if key is None:
            raise ValueError("train=True with model.dropout > 0 needs a dropout key (key=...)")
        rngs["dropout"] = key
    model = network(cfg, train=train)
    variables = {"params": params}
    inputs = _network_inputs(model, cond)
    if capture_intermediates:
        f_theta, state = model.apply(variables, x_t, sigma, x0_hat, rngs=rngs,
                                     mutable=["intermediates"], **inputs)
        return f_theta, state["intermediates"]
    return model.apply(variables, x_t, sigma, x0_hat, rngs=rngs, **inputs)


def denoise(
    params: Params,
    x_t: Array,
    sigma: Array,
    x0_hat: Array | None,
    *,
    cfg: ModelConfig,
    cond: Cond | None = None,
    key: jax.Array | None = None,
    train: bool = False,
    network: Network = SDT,
) -> Array:
    """Per-bit logits [B, S] float32 (residual + matched filter per ``cfg.logit_scaling``).

    x_t: [B, S] noisy bits; sigma: [B]; x0_hat: [B, S] self-conditioning estimate in [0, 1]
    (zeros = none) or None (the reference's bootstrap quirk, see ``residual_logits``). ``cond``
    and ``network``: see ``residual_logits``; the logits are the model's opinion also at clamped
    bits (the samplers impose the clamp).
    """
    if cfg.logit_scaling == "matched_filter_only":
        _check_inputs(x_t, sigma, x0_hat, cfg)
        return matched_filter_llr(x_t, sigma, cfg.mf_clip)
    f_theta = residual_logits(params, x_t, sigma, x0_hat, cfg=cfg, cond=cond, key=key, train=train,
                              network=network)
    return combine_logits(f_theta, x_t, sigma, cfg=cfg)


class GuidedLogits(NamedTuple):
    """Per-bit logits [B, S] float32 of one guided call: the guided mix, and each branch alone
    (the conditional branch on x_t, the unconditional one on ``unconditional_input``)."""

    guided: Array
    conditional: Array
    unconditional: Array


def unconditional_input(x_t: Array, sigma: Array, cond: Cond) -> Array:
    """x_t [B, S] as the unconditional branch sees it: each clamped bit noised to
    bit + σ·``cond.guidance_noise`` (as training noises a row whose conditioning was dropped),
    every other bit unchanged. sigma [B]."""
    if cond.clamp_mask is None or cond.guidance_noise is None:
        raise CondError("guidance needs cond.clamp_mask and cond.guidance_noise [batch, bits]; "
                        "build the Cond with Cond.clamped(mask, bits, guidance=w) and sample "
                        "through a guided sampler (it fills the noise)")
    noised = cond.clamp_bits.astype(jnp.float32) + sigma.astype(jnp.float32)[:, None] * \
        cond.guidance_noise.astype(jnp.float32)
    return jnp.where(cond.clamp_mask, noised, x_t.astype(jnp.float32))


def guided_denoise(
    params: Params,
    x_t: Array,
    sigma: Array,
    x0_hat: tuple[Array, Array],
    *,
    cfg: ModelConfig,
    cond: Cond,
    network: Network = SDT,
) -> GuidedLogits:
    """Classifier-free guidance over clamped bits: two network calls, one per branch.

    x_t [B, S] holds the clamped bits clean (the conditional input); sigma [B]; x0_hat =
    (conditional, unconditional) self-conditioning estimates [B, S], one per branch. With
    w = ``cond.guidance`` (scalar or [B]):

        f_c = f_θ(x_t, σ, x0_c)       f_u = f_θ(x_u, σ, x0_u)   x_u = unconditional_input(x_t)
        guided = combine((1 - w)·f_u + w·f_c, x_t, σ)  = mf(x_t, σ) + f_u + w·(f_c − f_u)

    Guidance acts on the network residual f_θ only, before the matched filter is added
    (``combine_logits``): mf is the exact likelihood of the observed x_t, known information
    rather than a model preference, and amplifying it by w would over-trust the noisy state
    (sharpen D at high σ) instead of extrapolating the condition's effect. The (1 − w)/w form
    makes w = 1 the conditional logits and w = 0 the unconditional residual exactly (0·f is
    ±0). ``conditional`` / ``unconditional`` are each branch's own logits (the unconditional on
    x_u), from which the samplers keep one self-conditioning state per branch. The
    unconditional branch gets no embedding (guidance over an embedding is refused).
    """
    if cond.guidance is None:
        raise CondError("guided_denoise needs cond.guidance (the scale w); set it or call denoise")
    if cond.embedding is not None:
        raise CondError("guidance over an embedding is not defined (the unconditional branch "
                        "drops clamped bits only); drop cond.embedding or cond.guidance")
    x0_cond, x0_uncond = x0_hat
    x_uncond = unconditional_input(x_t, sigma, cond)
    if cfg.logit_scaling == "matched_filter_only":  # no network: both branches are the filter
        f_cond = f_uncond = jnp.zeros(x_t.shape, jnp.float32)
    else:
        plain = cond.replace(guidance=None, guidance_noise=None)
        f_cond = residual_logits(params, x_t, sigma, x0_cond, cfg=cfg, cond=plain,
                                 network=network).astype(jnp.float32)
        f_uncond = residual_logits(params, x_uncond, sigma, x0_uncond, cfg=cfg,
                                   network=network).astype(jnp.float32)
    w = jnp.asarray(cond.guidance, jnp.float32)
    w = w[:, None] if w.ndim == 1 else w
    mixed = (1.0 - w) * f_uncond + w * f_cond
    return GuidedLogits(guided=combine_logits(mixed, x_t, sigma, cfg=cfg),
                        conditional=combine_logits(f_cond, x_t, sigma, cfg=cfg),
                        unconditional=combine_logits(f_uncond, x_uncond, sigma, cfg=cfg))


def matched_filter_denoiser(params, x_t: Array, sigma: Array, x0_hat: Array | None, *,
                            cond: Cond | None = None, clip: float = 30.0) -> Array:
    """The analytic independent-bit posterior logits ``matched_filter_llr`` [B, S]: the SDT at init.

    A denoiser with no parameters (``params`` is ignored), for tests and baselines.
    """
    del params, x0_hat, cond
    return matched_filter_llr(x_t, sigma, clip)


def _init_boxed(key: jax.Array, cfg: ModelConfig, network: Network = SDT):
    x = jnp.full((1, cfg.seq_bits), DATA_CENTER, jnp.float32)
    sigma = jnp.ones((1,), jnp.float32)
    variables = network(cfg).init({"params": key}, x, sigma, jnp.zeros_like(x))
    return variables.get("params", {})  # a network without parameters has no collection


_init_boxed_jit = jax.jit(_init_boxed, static_argnames=("cfg", "network"))


def init_params(key: jax.Array, cfg: ModelConfig, network: Network = SDT) -> dict:
    """Fresh float32 parameters (plain arrays) with the network's initialisers.

    For the SDT every adaLN-Zero gate is 0 at init, so f_θ ≡ 0 and the denoiser is the pure
    matched filter.
    """
    return nn.unbox(_init_boxed_jit(key, cfg, network))


def param_shapes(cfg: ModelConfig, network: Network = SDT) -> dict:
    """Parameter pytree of ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
    return nn.unbox(jax.eval_shape(lambda k: _init_boxed(k, cfg, network), jax.random.key(0)))


def count_params(cfg: ModelConfig, network: Network = SDT) -> int:
    """Number of trainable parameters, counted from shapes only."""
    return sum(leaf.size for leaf in jax.tree.leaves(param_shapes(cfg, network)))


def param_logical_axes(cfg: ModelConfig, network: Network = SDT) -> dict:
    """Pytree matching ``init_params`` whose leaves are ``PartitionSpec``s of logical axis names.

    Map them to mesh axes with one rules table (``flax.linen.logical_to_mesh_sharding``).
    """
    boxed = jax.eval_shape(lambda k: _init_boxed(k, cfg, network), jax.random.key(0))
    return nn.get_partition_spec(boxed)
