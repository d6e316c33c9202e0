"""Reusable transformer blocks (Flax Linen): dense layers with logical axes, affine-free LayerNorm,
adaLN-Zero, SwiGLU and activation sharding constraints (attention and RoPE: ``bitgen.nn.attention``).

Every parameter is declared with logical axis names (``embed``, ``mlp``, ``heads``, ``patch_in``,
``content``, ``head_hidden``, ``bits`` or ``None``) so one rules table can shard it; no module names a
mesh axis. Parameters are float32; ``dtype`` is the activation (compute) dtype. Normalisation is
computed in float32 whatever the compute dtype.

Shape letters: B batch, T tokens (= patches), E width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitgen import parallel

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
    """Sharding constraint on an activation named by logical ``axes`` (one per dimension of x).

    The mesh axes come from ``bitgen.parallel.LOGICAL_RULES`` via ``parallel.activation_spec``.
    Acts only while a mesh is in context (``parallel.activation_mesh`` or ``jax.set_mesh``, e.g.
    inside the jitted train step); without one it returns x unchanged (single device, tests).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, parallel.activation_spec(x.shape, axes, mesh.shape))
