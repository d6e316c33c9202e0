"""The one attention module: masks vs dense loop references, old implementations reproduced,
KV-cached decoding equal to full recompute.

Reference for "reproduces the old implementations": frozen copies of the three attention
computations as they were before ``bitgen.nn.attention`` existed (the SDT's ``layers.Attention``,
the AR model's cached ``_CausalAttention``, GPT-2's ``_Attention``), written as pure functions of
the same parameter dicts, with their own copy of the old rotary embedding.
"""

from __future__ import annotations

import decimal
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.nn import attention as attn

E, H = 16, 2  # width and heads of every module here (head dim 8)
# Tolerance of float32 comparisons between two orderings of the same arithmetic: each output is a
# softmax-weighted sum over at most n = 16 keys of values of magnitude |v| <~ 0.5 (inputs N(0, 1),
# N(0, 0.02) weights of fan-in 16), whose rounding error is bounded by n·u·|v| with u = 2^-24:
# 16 · 6e-8 · 0.5 ≈ 5e-7. The old RoPE evaluated cos/sin in float32 (XLA's, within a few ulps:
# |Δcos|, |Δsin| <= 4 · 6e-8 = 2.4e-7 at |cos|, |sin| <= 1), the new one takes float64 values
# rounded once: each rotated q, k element moves by <= 2 · 2.4e-7 · |q| with |q|, |k| <~ 0.5, a
# logit q·k/sqrt(8) over D = 8 by <= 8 · 2 · 2.4e-7 · 0.25 / 2.8 ≈ 3.4e-7, an output (a convex
# combination of |v| <~ 0.5, moved by at most the logit change) by <= 1.7e-7. In all ≈ 6.7e-7
# < 1e-6, the bound the old-vs-new comparisons must meet.
TOL = 1e-6


# --------------------------------------------------------------------------------------------------
# Frozen copies of the old computations (before bitgen.nn.attention)


def _old_rope(x, positions, base):
    inv_freq = 1.0 / (jnp.float32(base) ** (jnp.arange(0, x.shape[-1], 2, dtype=jnp.float32) / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[None]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _old_qkv(p, x, n_heads):
    batch, length, width = x.shape
    qkv = x @ p["kernel"] + p["bias"]
    return [t.reshape(batch, length, n_heads, width // n_heads) for t in jnp.split(qkv, 3, axis=-1)]


def old_sdt_attention(params, x, *, n_heads, rope_base=10000.0):
    """layers.Attention (causal=False, no positions/mask, eval mode, implementation "xla")."""
    batch, length, width = x.shape
    q, k, v = _old_qkv(params["qkv_proj"], x, n_heads)
    pos = jnp.arange(length)
    q, k = _old_rope(q, pos, rope_base), _old_rope(k, pos, rope_base)
    y = jax.nn.dot_product_attention(q, k, v, mask=None, is_causal=False, implementation="xla")
    return y.reshape(batch, length, width) @ params["out_proj"]["kernel"] + params["out_proj"]["bias"]


def old_ar_attention(params, x, offset, kv, *, n_heads, rope_base=10000.0):
    """ar._CausalAttention: causal RoPE attention over the chunk, or over a (k, v) cache."""
    batch, chunk, width = x.shape
    q, k, v = _old_qkv(params["qkv_proj"], x, n_heads)
    q_pos = offset + jnp.arange(chunk)
    q, k = _old_rope(q, q_pos, rope_base), _old_rope(k, q_pos, rope_base)
    if kv is None:
        keys, values, k_pos = k, v, q_pos
    else:
        keys = jax.lax.dynamic_update_slice(kv[0], k, (0, offset, 0, 0))
        values = jax.lax.dynamic_update_slice(kv[1], v, (0, offset, 0, 0))
        kv = (keys, values)
        k_pos = jnp.arange(keys.shape[1])
    mask = k_pos[None, :] <= q_pos[:, None]
    y = jax.nn.dot_product_attention(q, keys, values, mask=mask[None, None])
    out = y.reshape(batch, chunk, width) @ params["out_proj"]["kernel"] + params["out_proj"]["bias"]
    return out, kv


def old_gpt2_attention(params, x, *, n_heads):
    """gpt2._Attention: causal, no RoPE, c_attn / c_proj."""
    batch, length, width = x.shape
    q, k, v = _old_qkv(params["c_attn"], x, n_heads)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return y.reshape(batch, length, width) @ params["c_proj"]["kernel"] + params["c_proj"]["bias"]


# --------------------------------------------------------------------------------------------------
# Helpers


def random_x(seed: int, length: int, batch: int = 2) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, length, E))


def init(module: attn.Attention, length: int = 4) -> dict:
    """Params with non-zero biases, so a dropped or misplaced bias cannot go unnoticed."""
    params = nn.unbox(module.init(jax.random.key(0), random_x(0, length)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [leaf + 0.02 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def assert_close(actual, expected, tol=TOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=tol)


def dense_block_causal(q_positions, k_positions, block_size):
    out = np.zeros((len(q_positions), len(k_positions)), bool)
    for i, p in enumerate(q_positions):
        for j, s in enumerate(k_positions):
            out[i, j] = s // block_size <= p // block_size
    return out


# --------------------------------------------------------------------------------------------------
# Masks


@settings(max_examples=40, deadline=None)
@given(tq=st.integers(1, 12), tk=st.integers(1, 24), offset=st.integers(0, 20), block=st.integers(1, 8))
def test_block_causal_mask_equals_dense_loops(tq, tk, offset, block):
    q_pos, k_pos = offset + np.arange(tq), np.arange(tk)
    got = attn.block_causal_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), block)
    assert got.shape == (1, 1, tq, tk)
    np.testing.assert_array_equal(np.asarray(got[0, 0]), dense_block_causal(q_pos, k_pos, block))
    if block == 1:
        np.testing.assert_array_equal(np.asarray(attn.causal_mask(q_pos, k_pos)), np.asarray(got))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 16), n_segments=st.integers(1, 4), seed=st.integers(0, 99))
def test_segment_mask_equals_dense_loops(batch, length, n_segments, seed):
    segments = np.sort(np.random.default_rng(seed).integers(0, n_segments, (batch, length)), axis=1)
    got = np.asarray(attn.segment_mask(jnp.asarray(segments), jnp.asarray(segments)))
    expected = np.zeros((batch, 1, length, length), bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                expected[b, 0, i, j] = segments[b, i] == segments[b, j]
    np.testing.assert_array_equal(got, expected)


def test_masks_combine_with_and_and_broadcast():
    pos = jnp.arange(6)
    segments = jnp.array([[0, 0, 0, 1, 1, 1]])
    combined = attn.combine_masks(attn.causal_mask(pos, pos), None, attn.segment_mask(segments, segments))
    expected = np.tril(np.ones((6, 6), bool)) & (np.arange(6)[:, None] // 3 == np.arange(6)[None] // 3)
    np.testing.assert_array_equal(np.asarray(combined[0, 0]), expected)
    assert attn.combine_masks(None, None) is None
    assert bool(attn.bidirectional_mask(pos, pos).all())
    np.testing.assert_array_equal(np.asarray(attn.written_keys_mask(pos, 4))[0, 0, 0], [1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="block_size"):
        attn.block_causal_mask(pos, pos, 0)


# --------------------------------------------------------------------------------------------------
# The old implementations, reproduced


def test_reproduces_old_sdt_attention():
    module = attn.Attention(H, implementation="xla")
    params = init(module)
    x = random_x(2, 7)
    y, cache = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x)
    assert cache is None
    assert_close(y, jax.jit(functools.partial(old_sdt_attention, n_heads=H))(params, x))


def test_reproduces_old_gpt2_attention():
    module = attn.Attention(H, block_size=1, use_rope=False, qkv_name="c_attn", out_name="c_proj")
    params = init(module)
    assert set(params) == {"c_attn", "c_proj"}
    x = random_x(3, 9)
    y, _ = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x)
    assert_close(y, jax.jit(functools.partial(old_gpt2_attention, n_heads=H))(params, x))


def test_reproduces_old_ar_attention_with_and_without_cache():
    module = attn.Attention(H, block_size=1)
    params = init(module)
    x = random_x(4, 10)
    apply = jax.jit(lambda p, x, c: module.apply({"params": p}, x, cache=c))
    old = jax.jit(functools.partial(old_ar_attention, n_heads=H))
    y, _ = apply(params, x, None)
    assert_close(y, old(params, x, 0, None)[0])
    cache = attn.init_cache(2, 10, H, E // H)
    kv = (cache.keys, cache.values)
    for start, size in [(0, 4), (4, 1), (5, 3), (8, 2)]:
        y, cache = apply(params, x[:, start:start + size], cache)
        y_old, kv = old(params, x[:, start:start + size], start, kv)
        assert_close(y, y_old)
        assert int(cache.length) == start + size
    assert_close(cache.keys, kv[0])
    assert_close(cache.values, kv[1])


# --------------------------------------------------------------------------------------------------
# KV cache


def chunk_schedule(length: int, first: int, rest: int) -> list[tuple[int, int]]:
    """(start, size) chunks covering 0..length-1: one of ``first`` then chunks of ``rest``."""
    out, start = [], 0
    for size in [first] + [rest] * length:
        size = min(size, length - start)
        if size <= 0:
            break
        out.append((start, size))
        start += size
    return out


@settings(max_examples=8, deadline=None)
@given(block=st.integers(1, 4), n_blocks=st.integers(1, 4), chunk_is_block=st.booleans(),
       prefill_blocks=st.integers(0, 2), seed=st.integers(0, 99))
def test_cached_decoding_equals_full_recompute(block, n_blocks, chunk_is_block, prefill_blocks, seed):
    """Chunks of 1 or m tokens appended to a cache give, at each chunk's positions, the output of
    a full recompute over the prefix that ends with the chunk. With whole-block chunks that is also
    the full-sequence output (nothing later is visible to a finished block); block = 1 is causal."""
    length = block * n_blocks
    module = attn.Attention(H, block_size=block)
    params = init(module)
    x = random_x(seed, length)
    apply = jax.jit(lambda p, x, c: module.apply({"params": p}, x, cache=c))
    full, _ = apply(params, x, None)
    cache = attn.init_cache(2, length, H, E // H)
    first = min(length, max(1, prefill_blocks * block))
    for start, size in chunk_schedule(length, first, block if chunk_is_block else 1):
        got, cache = apply(params, x[:, start:start + size], cache)
        prefix, _ = apply(params, x[:, :start + size], None)
        assert_close(got, prefix[:, start:])
        if (start + size) % block == 0:
            assert_close(got, full[:, start:start + size])
    assert int(cache.length) == length


def test_cache_append_writes_at_length():
    cache = attn.init_cache(1, 5, 1, 2)
    cache = attn.cache_append(cache, jnp.ones((1, 2, 1, 2)), 2 * jnp.ones((1, 2, 1, 2)))
    cache = attn.cache_append(cache, 3 * jnp.ones((1, 1, 1, 2)), 4 * jnp.ones((1, 1, 1, 2)))
    np.testing.assert_array_equal(np.asarray(cache.keys[0, :, 0, 0]), [1, 1, 3, 0, 0])
    np.testing.assert_array_equal(np.asarray(cache.values[0, :, 0, 0]), [2, 2, 4, 0, 0])
    assert int(cache.length) == 3


# --------------------------------------------------------------------------------------------------
# Packed rows, the dropout kernel


def test_segment_mask_makes_packed_rows_independent():
    """Two sequences packed in one row with segment ids attend as if each ran alone (no RoPE, so
    absolute positions play no role)."""
    module = attn.Attention(H, block_size=1, use_rope=False)
    params = init(module)
    a, b = random_x(5, 4, batch=1), random_x(6, 6, batch=1)
    segments = jnp.array([[0] * 4 + [1] * 6])
    run = jax.jit(lambda p, x, m: module.apply({"params": p}, x, mask=m)[0])
    packed = run(params, jnp.concatenate([a, b], axis=1), attn.segment_mask(segments, segments))
    assert_close(packed[:, :4], run(params, a, None))
    assert_close(packed[:, 4:], run(params, b, None))


@pytest.mark.parametrize("block", [None, 1, 3])
def test_dropout_kernel_masks_like_the_fused_kernel(block):
    """The explicit-softmax (training) path applies the same mask: at a negligible dropout rate
    (1e-9, so no probability is dropped and the 1/(1-rate) rescale is 1 in float32) it matches."""
    module = attn.Attention(H, block_size=block, dropout=1e-9)
    params = init(module)
    x = random_x(7, 9)
    run = jax.jit(lambda p, x, train: module.apply({"params": p}, x, train=train,
                                                   rngs={"dropout": jax.random.key(0)})[0],
                  static_argnums=2)
    assert_close(run(params, x, True), run(params, x, False))


# --------------------------------------------------------------------------------------------------
# RoPE tables


@settings(max_examples=5, deadline=None)
@given(length=st.integers(1, 12), extra=st.integers(0, 8), start=st.integers(0, 8), seed=st.integers(0, 99))
def test_rope_of_traced_positions_equals_rope_of_static_positions(length, extra, start, seed):
    """The KV-cache path (traced positions gathered from a table over 0..max-1) and the static
    path (NumPy positions) rotate by the same values, bit for bit."""
    x = jax.random.normal(jax.random.key(seed), (2, length, H, E // H))
    positions = start + np.arange(length)
    static = jax.jit(lambda x: attn.apply_rope(x, positions, 10000.0))(x)
    traced = jax.jit(lambda x, p: attn.apply_rope(x, p, 10000.0, max_positions=start + length + extra))(
        x, jnp.asarray(positions))
    np.testing.assert_array_equal(np.asarray(static), np.asarray(traced))
    per_row = jax.jit(lambda x: attn.apply_rope(x, np.stack([positions, positions[::-1]]), 10000.0))(x)
    reversed_ = jax.jit(lambda x: attn.apply_rope(x, positions[::-1], 10000.0))(x)
    np.testing.assert_array_equal(np.asarray(per_row[0]), np.asarray(static[0]))
    np.testing.assert_array_equal(np.asarray(per_row[1]), np.asarray(reversed_[1]))


def test_rope_inverse_frequencies_are_rounded_once():
    """Against 40-digit decimal arithmetic at the reference's float32 exponents: float64 pow and
    divide (<= 1 + 0.5 float64 ulps, relative error <= 2^-52) rounded once to float32 lie within
    half a float32 spacing of the exact value plus that 2^-52 relative term."""
    decimal.getcontext().prec = 40
    for head_dim, base in ((8, 10000.0), (64, 10000.0), (96, 500000.0), (6, 1e6)):
        got = attn.rope_inverse_frequencies(head_dim, base)
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        exact = np.array([float(1 / decimal.Decimal(base) ** decimal.Decimal(float(e))) for e in exponents])
        assert got.dtype == np.float32
        assert np.all(np.abs(got - exact) <= np.spacing(got) / 2 + 2.0**-52 * exact)


def test_rope_table_is_cos_sin_of_float32_angles_rounded_once():
    positions = np.arange(300)
    table = attn.rope_table(positions, 8, 10000.0)
    angles = (positions.astype(np.float32)[:, None] * attn.rope_inverse_frequencies(8, 10000.0))
    angles = angles.astype(np.float64)
    # libm's float64 cos/sin rounded once to float32: within half the float32 spacing of libm's
    # value (the spacing below a power of two is half the one above, so the half-spacing above
    # bounds both sides). libm and NumPy are each within a float64 ulp of the exact value, and a
    # float64 ulp at |x| <= 1 is <= 2^-52, so they differ by <= 2^-51.
    for got, want in ((table[0, :, :4], np.cos(angles)), (table[1, :, 4:], np.sin(angles))):
        assert np.all(np.abs(got.astype(np.float64) - want) <= np.abs(np.spacing(got)) / 2 + 2.0**-51)
    np.testing.assert_array_equal(table[:, :, :4], table[:, :, 4:])  # [f, f] layout
    # Any int shape, repeated positions included: the rows of the table above.
    picks = np.array([[299, 0, 5], [5, 5, 17]])
    np.testing.assert_array_equal(attn.rope_table(picks, 8, 10000.0), table[:, picks])


def test_traced_positions_without_a_bound_are_refused():
    x = jnp.ones((1, 3, H, E // H))
    with pytest.raises(ValueError, match="max_positions"):
        jax.jit(lambda p: attn.apply_rope(x, p, 10000.0))(jnp.arange(3))


def test_attention_program_evaluates_no_cos_or_sin():
    """The tables are constants: the compiled attention (with and without a cache) holds no
    cosine or sine, which XLA:CPU would otherwise evaluate for every rotated element."""
    module = attn.Attention(H)
    x = jnp.ones((2, 5, E))
    params = module.init(jax.random.key(0), x)
    cache = attn.init_cache(2, 8, H, E // H)
    for args in ((x,), (x, cache)):
        text = jax.jit(lambda p, x, c=None: module.apply(p, x, cache=c)).lower(params, *args).compile().as_text()
        assert "cosine(" not in text and "sine(" not in text
