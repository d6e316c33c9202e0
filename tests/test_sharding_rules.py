"""Activation sharding constraints act: inside the SDT / AR forward the trunk tokens
[batch, seq, embed] are laid out as ``parallel.LOGICAL_RULES`` says while a mesh is in context,
and the numbers do not change. Runs on the 8 fake CPU devices of conftest.py."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec

from bitgen import parallel
from bitgen.config import MeshConfig, ModelConfig
from bitgen.diffusion.denoiser import init_params, residual_logits
from bitgen.nn import ar
from bitgen.nn.sdt import SDTBlock

SDT_CFG = ModelConfig(patch_size=5, seq_tokens=8, embed_dim=32, n_heads=2, n_blocks=2, dim_ff=48,
                      content_dim=16, head_hidden=16, dropout=0.0)
AR_CFG = ar.ARConfig(vocab_size=23, seq_len=8, embed_dim=32, n_heads=4, n_blocks=2, dim_ff=96, dropout=0.0)
BATCH = 8
# The rules table maps (batch, seq, embed) to (("data", "fsdp"), None, "fsdp"); fsdp is taken by
# the batch, so embed is replicated: on data=4, fsdp=1, tensor=2 the rows are split 4 ways and
# every other dimension (and the tensor axis) is replicated.
TOKENS_SPEC = PartitionSpec(("data", "fsdp"), None, None)
# Sharded vs unsharded: only whole rows move between devices, so every row sees the same float32
# operations; a different fusion may reorder sums of <= 48 terms of O(1) values, whose rounding
# is bounded by 48·u·|sum| ≈ 48 · 6e-8 · O(10) ≈ 3e-5 relative to the O(10) logits, hence 1e-5
# relative plus 1e-5 absolute for logits near 0.
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))


def block_output_shardings(block_type: type[nn.Module]):
    """An interceptor recording the sharding of every ``block_type`` output, and the record."""
    seen = []

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, block_type) and context.method_name == "__call__":
            tokens = out[0] if isinstance(out, tuple) else out
            jax.debug.inspect_array_sharding(tokens, callback=seen.append)
        return out

    return intercept, seen


def sdt_inputs():
    k1, k2 = jax.random.split(jax.random.key(0))
    x_t = jax.random.normal(k1, (BATCH, SDT_CFG.seq_bits)) + 0.5
    sigma = jnp.exp(jax.random.uniform(k2, (BATCH,), minval=-2.0, maxval=2.0))
    return x_t, sigma, jnp.full_like(x_t, 0.5)


def random_sdt_params():
    """Every gate open (the init's zero adaLN gates would make the trunk output trivial)."""
    params = init_params(jax.random.key(0), SDT_CFG)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def sdt_forward(params, x_t, sigma, x0_hat):
    return residual_logits(params, x_t, sigma, x0_hat, cfg=SDT_CFG)


def test_sdt_trunk_tokens_follow_the_rules_and_numerics_are_unchanged(mesh):
    """Inputs and params are replicated, so without the constraint nothing would split the
    activations: the row split seen inside the trunk is the rules table acting."""
    params, inputs = random_sdt_params(), sdt_inputs()
    intercept, seen = block_output_shardings(SDTBlock)

    def traced(*args):
        with nn.intercept_methods(intercept):
            return sdt_forward(*args)

    replicated = parallel.replicated(mesh)
    placed = jax.device_put((params, *inputs), replicated)
    sharded = jax.jit(parallel.with_activation_mesh(traced, mesh))(*placed)
    assert len(seen) == SDT_CFG.n_blocks
    for sharding in seen:
        assert sharding.is_equivalent_to(NamedSharding(mesh, TOKENS_SPEC), 3), sharding
    seen.clear()
    jax.jit(traced)(*placed)  # no mesh in context: the constraint is the identity
    assert all(s.is_fully_replicated for s in seen)
    unsharded = jax.jit(sdt_forward)(params, *inputs)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=RTOL, atol=ATOL)


def test_ar_blocks_follow_the_rules_around_a_jitted_call(mesh):
    """The sampler pattern: ``activation_mesh`` entered around the first call of a jitted function."""
    params = ar.init_ar_params(jax.random.key(0), AR_CFG)
    ids = jax.random.randint(jax.random.key(1), (BATCH, AR_CFG.seq_len), 0, AR_CFG.vocab_size)
    intercept, seen = block_output_shardings(ar.DecoderBlock)

    @jax.jit
    def logits_fn(params, ids):
        with nn.intercept_methods(intercept):
            return ar.ar_logits(params, ids, cfg=AR_CFG)

    placed = jax.device_put((params, ids), parallel.replicated(mesh))
    with parallel.activation_mesh(mesh):
        sharded = logits_fn(*placed)
    assert len(seen) == AR_CFG.n_blocks
    assert all(s.is_equivalent_to(NamedSharding(mesh, TOKENS_SPEC), 3) for s in seen), seen
    unsharded = jax.jit(functools.partial(ar.ar_logits, cfg=AR_CFG))(params, ids)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=RTOL, atol=ATOL)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(1, 16)),
       sizes=st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2])))
def test_activation_spec_keeps_only_dividing_mesh_axes(shape, sizes):
    mesh_sizes = dict(zip(parallel.MESH_AXES, sizes))
    logical = ("batch", "seq", "mlp")  # -> (("data", "fsdp"), None, "tensor")
    spec = parallel.activation_spec(shape, logical, mesh_sizes)
    full = parallel.logical_to_spec(logical)
    for size, got, wanted in zip(shape, spec, full):
        got_axes = (got,) if isinstance(got, str) else tuple(got or ())
        wanted_axes = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        assert set(got_axes) <= set(wanted_axes)
        assert size % int(np.prod([mesh_sizes[a] for a in got_axes])) == 0
        if size % int(np.prod([mesh_sizes[a] for a in wanted_axes])) == 0:
            assert got_axes == wanted_axes  # nothing is dropped when the whole split divides


def test_activation_spec_drops_axes_the_mesh_lacks_and_names_rank_errors():
    assert parallel.activation_spec((8, 4), ("batch", "mlp"), {"data": 4}) == PartitionSpec("data", None)
    with pytest.raises(parallel.ShardingError, match="name every dimension"):
        parallel.activation_spec((8, 4), ("batch",), {"data": 4})
