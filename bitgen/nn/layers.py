"""Reusable transformer blocks (Flax Linen): dense layers with logical axes, affine-free LayerNorm,
adaLN-Zero, rotate-half RoPE, multi-head attention and SwiGLU.

Every parameter is declared with logical axis names (``embed``, ``mlp``, ``heads``, ``patch_in``,
``content``, ``head_hidden``, ``bits`` or ``None``) so one rules table can shard it; no module names a
mesh axis. Parameters are float32; ``dtype`` is the activation (compute) dtype. Normalisation,
softmax and RoPE tables are computed in float32 whatever the compute dtype.

Shape letters: B batch, T tokens (= patches), H heads, D head dim, E width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Axes = tuple[str | None, str | None]

normal_002 = nn.initializers.normal(stddev=0.02)  # the reference's N(0, 0.02) for every Linear
zeros = nn.initializers.zeros
xavier_uniform = nn.initializers.xavier_uniform()


def dense(
    features: int,
    axes: Axes,
    *,
    name: str,
    dtype=jnp.float32,
    use_bias: bool = True,
    kernel_init: Callable = normal_002,
) -> nn.Dense:
    """A Linear layer whose kernel [in, out] carries logical axes ``axes`` (bias: ``(axes[1],)``).

    Kernel layout is [in, out] (the transpose of PyTorch's [out, in]); biases are zero-initialised.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(zeros, (axes[1],)),
        name=name,
    )


def layer_norm(x: Array, eps: float = 1e-5) -> Array:
    """LayerNorm over the last axis without affine parameters, computed in float32.

    Uses the biased variance E[(x - mean)^2] (PyTorch's ``F.layer_norm``); returns x's dtype.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class AdaLNZero(nn.Module):
    """adaLN-Zero: ``(s, b, g) = Linear(SiLU(cond))``; returns ``((1 + s) LN(x) + b, g)``.

    The Linear is zero-initialised, so at init the modulation is the identity and the gate is 0
    (every gated residual branch starts switched off). Param name ``mlp_1`` mirrors the reference's
    ``adaln.mlp.1``. x: [B, ..., d]; cond: [B, c]; returns h [B, ..., d] and g [B, d].
    """

    features: int
    axes: Axes = ("embed", "mlp")
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array) -> tuple[Array, Array]:
        mod = dense(3 * self.features, self.axes, name="mlp_1", dtype=self.dtype,
                    kernel_init=zeros)(nn.silu(cond))
        scale, shift, gate = jnp.split(mod, 3, axis=-1)
        # Broadcast the per-sequence modulation over every position axis of x.
        expand = (slice(None),) + (None,) * (x.ndim - 2)
        h = (1 + scale[expand]) * layer_norm(x) + shift[expand]
        self.sow("intermediates", "out0", h)
        self.sow("intermediates", "out1", gate)
        return h, gate


def rope_inverse_frequencies(head_dim: int, base: float) -> Array:
    """[D/2] float32: ``1 / base^(2i/D)`` as the reference computes it (float32 pow)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(base) ** exponents)


def apply_rope(x: Array, positions: Array, base: float) -> Array:
    """Rotary embedding in the rotate-half (GPT-NeoX) layout.

    x: [B, T, H, D]; positions: [T] or [B, T] (any integer offset, e.g. a KV-cache position).
    Frequencies are concatenated ``[f, f]`` and ``rotate_half(x) = [-x2, x1]``; tables in float32.
    """
    head_dim = x.shape[-1]
    inv_freq = rope_inverse_frequencies(head_dim, base)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional RoPE / causal mask.

    Param names mirror the reference (``qkv_proj``, ``out_proj``); the fused output is laid out
    ``[q | k | v]``, each head-major. Softmax scale 1/sqrt(D). In eval mode (or dropout 0) the
    kernel is ``jax.nn.dot_product_attention(implementation=...)``; training with dropout uses an
    explicit float32 softmax so attention probabilities can be dropped.
    """

    n_heads: int
    dropout: float = 0.0
    causal: bool = False
    use_rope: bool = True
    rope_base: float = 10000.0
    implementation: str | None = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array | None = None, mask: Array | None = None,
                 train: bool = False) -> Array:
        """x: [B, T, E]; positions: [T] or [B, T] (default 0..T-1); mask: bool, broadcastable to
        [B, H, T, T], True = may attend. Returns [B, T, E]."""
        batch, length, width = x.shape
        head_dim = width // self.n_heads
        qkv = dense(3 * width, ("embed", "heads"), name="qkv_proj", dtype=self.dtype)(x)
        q, k, v = (t.reshape(batch, length, self.n_heads, head_dim)
                   for t in jnp.split(qkv, 3, axis=-1))
        if self.use_rope:
            pos = jnp.arange(length) if positions is None else positions
            q = apply_rope(q, pos, self.rope_base)
            k = apply_rope(k, pos, self.rope_base)
        if train and self.dropout > 0.0:
            y = self._explicit_attention(q, k, v, mask)
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal,
                                             implementation=self.implementation)
        y = y.reshape(batch, length, width)
        return dense(width, ("heads", "embed"), name="out_proj", dtype=self.dtype)(y)

    def _explicit_attention(self, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
        scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if self.causal:
            length = q.shape[1]
            causal = jnp.tril(jnp.ones((length, length), dtype=bool))
            mask = causal if mask is None else mask & causal
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = nn.Dropout(self.dropout, deterministic=False)(probs).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class SwiGLU(nn.Module):
    """``Wo(Dropout(Wa(h) * SiLU(Wb(h))))`` with biases; names mirror the reference."""

    hidden: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: [..., E] -> [..., E]."""
        a = dense(self.hidden, ("embed", "mlp"), name="Wa", dtype=self.dtype)(x)
        b = dense(self.hidden, ("embed", "mlp"), name="Wb", dtype=self.dtype)(x)
        y = nn.Dropout(self.dropout, deterministic=not train)(a * nn.silu(b))
        return dense(x.shape[-1], ("mlp", "embed"), name="Wo", dtype=self.dtype)(y)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
    """Logical sharding constraint on an activation; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, tuple(axes))
