"""The one multi-head attention of bitgen: mask builders, rotary positions and a KV cache.

Every model (the SDT denoiser, the AR transformer, GPT-2) uses ``Attention``; they differ only in
its options (RoPE or not, mask kind, parameter names, kernel, dtype).

Masks are boolean, True = may attend, shaped [B or 1, 1, Tq, Tk] so they broadcast over heads.
Builders take *absolute* positions (int [Tq] / [Tk], or [B, Tq] / [B, Tk]), so a query chunk at
offset o against a cache of keys at 0..T_max-1 is just ``q_positions = o + arange(C)``. Combine
masks with ``combine_masks`` (logical AND).

A ``KVCache`` holds one attention layer's keys and values (after RoPE) for positions
0..T_max-1 plus the number already written. Calling ``Attention`` with a cache writes the chunk
at positions length..length+C-1 and attends over every written key, so prefill (a prompt chunk)
and append (one token, or one block of m tokens for block-causal generation) are the same call.

Shape letters: B batch, C chunk (query) length, T_max cache length, H heads, D head dim, E width.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitgen.nn.layers import Dropout, dense

Array = jax.Array


# --------------------------------------------------------------------------------------------------
# Masks


def _pair(q_values: Array, k_values: Array) -> tuple[Array, Array]:
    """[..., Tq] and [..., Tk] -> [B|1, 1, Tq, 1] and [B|1, 1, 1, Tk] for broadcasting."""
    q = jnp.asarray(q_values)
    k = jnp.asarray(k_values)
    q = q[None] if q.ndim == 1 else q
    k = k[None] if k.ndim == 1 else k
    return q[:, None, :, None], k[:, None, None, :]


def bidirectional_mask(q_positions: Array, k_positions: Array) -> Array:
    """Every query sees every key: all True, [B|1, 1, Tq, Tk]."""
    q, k = _pair(q_positions, k_positions)
    return jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)


def block_causal_mask(q_positions: Array, k_positions: Array, block_size: int) -> Array:
    """Full attention inside each block of ``block_size`` positions, causal across blocks.

    Query at position p sees key at position s iff ``s // m <= p // m`` (blocks start at position
    0). ``block_size=1`` is the causal mask. Returns [B|1, 1, Tq, Tk].
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1 (1 = causal)")
    q, k = _pair(q_positions, k_positions)
    return k // block_size <= q // block_size


def causal_mask(q_positions: Array, k_positions: Array) -> Array:
    """Query at position p sees keys at positions <= p: ``block_causal_mask`` with m = 1."""
    return block_causal_mask(q_positions, k_positions, 1)


def segment_mask(q_segments: Array, k_segments: Array) -> Array:
    """Packed rows: a query sees only keys with the same segment id. ids [B, Tq] / [B, Tk] (or
    [Tq] / [Tk]) -> [B|1, 1, Tq, Tk]."""
    q, k = _pair(q_segments, k_segments)
    return q == k


def written_keys_mask(k_positions: Array, length: Array) -> Array:
    """Cache slots that hold a key: position < length (scalar, may be traced). [1, 1, 1, Tk]."""
    return (jnp.asarray(k_positions) < length)[None, None, None, :]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given masks (None entries are skipped; None if none is given)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    combined = present[0]
    for mask in present[1:]:
        combined = combined & mask
    return combined


# --------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inverse_frequencies(head_dim: int, base: float) -> np.ndarray:
    """[D/2] float32: ``1 / base^e`` at the reference's float32 exponents ``e = 2i/D``, evaluated
    in float64 (libm's ``pow``) and rounded once (the reference's float32 pow is within an ulp)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.array([1.0 / math.pow(base, float(e)) for e in exponents], np.float32)


def rope_table(positions: np.ndarray, head_dim: int, base: float) -> np.ndarray:
    """float32 [2, ..., D] cos and sin at ``positions`` (any int shape), built on the host.

    Angles are rounded to float32 as the reference rounds them (float32 frequencies times float32
    positions); cos and sin are libm's float64 values rounded once, not NumPy's, whose SIMD paths
    vary with the CPU. Frequencies are concatenated ``[f, f]`` (rotate-half layout).
    """
    positions = np.asarray(positions)
    values, index = np.unique(positions.ravel(), return_inverse=True)
    angles = values.astype(np.float32)[:, None] * rope_inverse_frequencies(head_dim, base)
    flat = angles.astype(np.float64).ravel().tolist()
    table = np.array([list(map(math.cos, flat)), list(map(math.sin, flat))], np.float32)
    table = table.reshape(2, *angles.shape)[:, index.reshape(positions.shape)]
    return np.concatenate([table, table], axis=-1)


@functools.lru_cache(maxsize=16)
def _rope_rows(n_positions: int, head_dim: int, base: float) -> np.ndarray:
    """``rope_table`` of positions 0..n_positions-1, kept per size (every layer asks again)."""
    table = rope_table(np.arange(n_positions), head_dim, base)
    table.flags.writeable = False  # shared by every caller
    return table


def rope_cos_sin(positions: Array | np.ndarray, head_dim: int, base: float, dtype, *,
                 max_positions: int | None = None) -> tuple[Array, Array]:
    """cos, sin [B or 1, T, 1, D] in ``dtype`` for positions [T] or [B, T].

    Positions known when tracing (NumPy, or concrete arrays) give a table that is a constant of
    the program. Traced positions need ``max_positions``: the rows are gathered from the constant
    table over 0..max_positions-1, so for 0 <= p < max_positions both give the same values, bit
    for bit; a position outside takes the nearest row (docs/benchmarks.md, "RoPE tables and the
    clip", says why the tables are constants).
    """
    if isinstance(positions, jax.core.Tracer):
        if max_positions is None:
            raise ValueError("RoPE: traced positions need max_positions= (a bound known when "
                             "tracing, e.g. the KV cache's capacity); or pass NumPy positions")
        table = jnp.take(_rope_rows(max_positions, head_dim, base), positions, axis=1, mode="clip")
    else:
        table = rope_table(np.asarray(positions), head_dim, base)
    if table.ndim == 3:  # [2, T, D]: one set of positions for every row
        table = table[:, None]
    return tuple(jnp.asarray(t)[:, :, None, :].astype(dtype) for t in (table[0], table[1]))


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    """``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = [-x2, x1]``; x [B, T, H, D]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def apply_rope(x: Array, positions: Array | np.ndarray, base: float, *,
               max_positions: int | None = None) -> Array:
    """Rotary embedding in the rotate-half (GPT-NeoX) layout, in one call; x [B, T, H, D],
    positions [T] or [B, T] absolute integer positions (see ``rope_cos_sin``)."""
    return rotate(x, *rope_cos_sin(positions, x.shape[-1], base, x.dtype, max_positions=max_positions))


# --------------------------------------------------------------------------------------------------
# KV cache


class KVCache(NamedTuple):
    """One attention layer's cache: keys/values [B, T_max, H, D] (keys after RoPE, in the compute
    dtype) and ``length`` (int32 scalar), the number of positions written (0..length-1)."""

    keys: Array
    values: Array
    length: Array


def init_cache(batch: int, max_len: int, n_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for ``max_len`` positions (zeros, length 0)."""
    shape = (batch, max_len, n_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def cache_append(cache: KVCache, keys: Array, values: Array) -> KVCache:
    """Write a chunk keys/values [B, C, H, D] at positions length..length+C-1; length += C.

    Writing past T_max is not detected under jit (XLA clamps the start); size caches for the
    longest sequence.
    """
    start = (0, cache.length, 0, 0)
    return KVCache(
        jax.lax.dynamic_update_slice(cache.keys, keys.astype(cache.keys.dtype), start),
        jax.lax.dynamic_update_slice(cache.values, values.astype(cache.values.dtype), start),
        cache.length + keys.shape[1],
    )


# --------------------------------------------------------------------------------------------------
# The module


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, optional RoPE, structural mask, KV cache.

    Attributes:
      n_heads: number of heads H (D = E / H); softmax scale 1/sqrt(D).
      block_size: structural mask. None = bidirectional, 1 = causal, m = block-causal.
      use_rope: rotate q and k by their absolute positions (rotate-half RoPE, ``rope_base``).
      max_positions: a bound on ``positions=`` when they are traced (e.g. inside ``nn.remat``);
        positions known when tracing need none. A traced position at or above it is rotated as
        position max_positions-1, silently (see ``rope_cos_sin``).
      dropout: attention-probability dropout, active only with ``train=True``.
      use_bias: biases on the qkv and output projections.
      implementation: ``jax.nn.dot_product_attention`` kernel (``"xla"``, ``"cudnn"`` or None =
        JAX's choice); used whenever attention dropout is off.
      qkv_name, out_name: parameter names of the two projections (checkpoint layouts differ).
      dtype: compute dtype of projections and attention; parameters are float32.

    The fused projection output is laid out ``[q | k | v]``, each head-major. With dropout in
    training the kernel is an explicit float32 softmax so the probabilities can be dropped.
    """

    n_heads: int
    block_size: int | None = None
    use_rope: bool = True
    rope_base: float = 10000.0
    max_positions: int | None = None
    dropout: float = 0.0
    use_bias: bool = True
    implementation: str | None = None
    qkv_name: str = "qkv_proj"
    out_name: str = "out_proj"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, cache: KVCache | None = None, mask: Array | None = None,
                 positions: Array | np.ndarray | None = None,
                 train: bool = False) -> tuple[Array, KVCache | None]:
        """x [B, C, E] at positions p0..p0+C-1 (p0 = cache.length, or 0 without a cache).

        mask: extra bool mask broadcastable to [B, 1, C, Tk] (Tk = C, or T_max with a cache),
        ANDed with the structural one (e.g. ``segment_mask`` for packed rows).
        positions: int [C], the chunk's own positions instead of p0..p0+C-1 (without a cache
        only; e.g. two copies of one row side by side, each at the row's positions); NumPy, or
        traced below ``max_positions``.
        Returns (y [B, C, E], the cache with this chunk written, or None).
        """
        batch, chunk, width = x.shape
        head_dim = width // self.n_heads
        qkv = dense(3 * width, ("embed", "heads"), name=self.qkv_name, dtype=self.dtype,
                    use_bias=self.use_bias)(x)
        q, k, v = (t.reshape(batch, chunk, self.n_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))
        if positions is not None and cache is not None:
            raise ValueError("positions= is for a chunk without a cache (a cache sets them)")
        if cache is not None:
            q_pos, max_positions = cache.length + jnp.arange(chunk), cache.keys.shape[1]
        else:  # NumPy (constants when tracing) unless the caller's positions are traced
            q_pos = np.arange(chunk) if positions is None else positions
            max_positions = self.max_positions
        if self.use_rope:
            cos, sin = rope_cos_sin(q_pos, head_dim, self.rope_base, q.dtype,
                                    max_positions=max_positions)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            k_pos, written = q_pos, None
        else:
            cache = cache_append(cache, k, v)
            k, v = cache.keys, cache.values
            k_pos = jnp.arange(k.shape[1])
            written = written_keys_mask(k_pos, cache.length)  # unwritten slots hold zeros
        structural = None if self.block_size is None else block_causal_mask(q_pos, k_pos, self.block_size)
        mask = combine_masks(structural, written, mask)
        if train and self.dropout > 0.0:
            y = self._explicit_attention(q, k, v, mask)
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        y = dense(width, ("heads", "embed"), name=self.out_name, dtype=self.dtype,
                  use_bias=self.use_bias)(y.reshape(batch, chunk, width))
        return y, cache

    def _explicit_attention(self, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
        scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = Dropout(self.dropout, deterministic=False)(probs).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
