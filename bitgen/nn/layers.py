"""Reusable transformer blocks (Flax Linen): dense layers with logical axes, affine-free LayerNorm,
adaLN-Zero, SwiGLU, dropout and activation sharding constraints (attention and RoPE:
``bitgen.nn.attention``).

Every parameter is declared with logical axis names (``embed``, ``mlp``, ``heads``, ``patch_in``,
``content``, ``head_hidden``, ``bits`` or ``None``) so one rules table can shard it; no module names a
mesh axis. Parameters are float32; ``dtype`` is the activation (compute) dtype. Normalisation is
computed in float32 whatever the compute dtype.

Shape letters: B batch, T tokens (= patches), E width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import math

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


# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): 20
# rounds in 5 groups of 4, rotation constants alternating between the two rows, key injection
# after every group with the third key word k0 ^ k1 ^ PARITY.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _threefry2x32(key: Array, high: Array, low: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 block cipher of the counter pairs (high, low) [uint32] under key [2]."""
    schedule = (key[0], key[1], key[0] ^ key[1] ^ jnp.uint32(_THREEFRY_PARITY))
    x0, x1 = high + schedule[0], low + schedule[1]
    for group in range(5):
        for r in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def _unrolled_threefry_applies(key: Array, size: int) -> bool:
    """Whether ``keep_mask`` may compute ``key``'s bits itself: one threefry key (typed, or raw
    uint32 [2] under the threefry default), jax's partitionable bit layout, and fewer than 2³²
    draws (the counter's high word stays 0)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        one_threefry_key = key.ndim == 0 and str(jax.random.key_impl(key)) == "threefry2x32"
    else:
        one_threefry_key = key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32"
    # Under x64 jax.random.bernoulli draws float64 uniforms: other bits, so jax computes them.
    return (one_threefry_key and bool(jax.config.jax_threefry_partitionable) and size < 2**32
            and not jax.config.jax_enable_x64)


def keep_mask(key: Array, keep_prob: float, shape: tuple[int, ...]) -> Array:
    """Bool mask [shape], True with probability ``keep_prob``: ``jax.random.bernoulli(key,
    keep_prob, shape)`` bit for bit, computed with the cipher rounds unrolled.

    jax lowers threefry on CPU as a rolled 5-iteration while loop that writes both counter
    arrays back to memory every iteration; written out here, the rounds fuse into the mask's one
    elementwise pass (about 10x faster for a [4, 128, 2048] mask on CPU). The draws are jax's:
    counter i = row-major index (high word 0), bits = x0 ^ x1 of the cipher, uniform =
    bitcast(bits >> 9 | 1.0f) - 1 in [0, 1), kept where uniform < keep_prob. Keys of another PRNG
    implementation or layout fall back to ``jax.random.bernoulli`` (tests/test_dropout.py checks
    equality).
    """
    size = math.prod(shape)
    if not _unrolled_threefry_applies(key, size):
        return jax.random.bernoulli(key, keep_prob, shape)
    key_words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    low = jax.lax.iota(jnp.uint32, size).reshape(shape)
    x0, x1 = _threefry2x32(key_words.astype(jnp.uint32), jnp.zeros(shape, jnp.uint32), low)
    mantissa = ((x0 ^ x1) >> jnp.uint32(9)) | jnp.uint32(0x3F800000)  # a float in [1, 2)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    return uniform < jnp.float32(keep_prob)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` (same name, rng stream and output, bit for bit) with its mask from
    ``keep_mask``: inverted dropout, kept values scaled by 1/(1 - rate)."""

    rate: float
    deterministic: bool = False
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        if self.rate == 0.0 or self.deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        mask = keep_mask(self.make_rng(self.rng_collection), keep_prob, inputs.shape)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


def _first_element_rewritten(t: Array) -> Array:
    """t with its first element written back onto itself: the identity, linear in t."""
    start = (0,) * t.ndim
    return jax.lax.dynamic_update_slice(t, jax.lax.dynamic_slice(t, start, (1,) * t.ndim), start)


@jax.custom_jvp
def _cotangent_once(x: Array) -> Array:
    return x


@_cotangent_once.defjvp
def _cotangent_once_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    # Reverse mode transposes this tangent map: the cotangent's first element is zeroed in place
    # (and added back), an update XLA makes on the cotangent written to memory.
    return primals[0], _first_element_rewritten(tangents[0])


def residual_cotangent_once(x: Array) -> Array:
    """Identity on a residual stream x [B, T, E]; on one CPU device its cotangent is summed once.

    XLA:CPU otherwise re-adds every later block's contribution inside each consumer of the
    cotangent (docs/benchmarks.md, "The residual stream's cotangent"). The custom JVP writes the
    first element back onto itself; its transpose zeroes that element of the cotangent in place
    and adds it back, and an in-place update needs the sum in memory. Values are unchanged
    (signed zeros may become +0.0). Single CPU device only (no mesh, or a mesh of one), arrays
    with elements; otherwise x is returned as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if (jax.default_backend() != "cpu" or (not mesh.empty and mesh.size > 1) or x.ndim == 0
            or x.size == 0):
        return x
    return _cotangent_once(x)


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
        y = Dropout(self.dropout, deterministic=not train)(a * nn.silu(b))
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
