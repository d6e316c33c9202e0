"""Chunked, rematerialised per-bit head (``model.head_chunk_tokens``) against the whole-sequence head."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.config import ConfigError, ExperimentConfig, ModelConfig, validate
from bitgen.nn.sdt import SDT

CFG = ModelConfig(patch_size=5, seq_tokens=8, embed_dim=32, n_heads=2, n_blocks=1, dim_ff=64,
                  content_dim=8, head_hidden=16)
BATCH = 2


def _inputs():
    k_x, k_sc = jax.random.split(jax.random.key(0))
    x_t = jax.random.normal(k_x, (BATCH, CFG.seq_bits))
    sigma = jnp.array([0.3, 2.0])
    x0_hat = jax.random.uniform(k_sc, (BATCH, CFG.seq_bits))
    return x_t, sigma, x0_hat


def _init(cfg: ModelConfig):
    return nn.unbox(SDT(cfg).init(jax.random.key(1), *_inputs())["params"])


@pytest.fixture(scope="module")
def params():
    """Fresh parameters moved off init: the head's adaLN gate starts at 0, which would make every
    head output the same constant and hide a wrong chunking."""
    fresh = _init(CFG)
    leaves, treedef = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def _chunked(chunk: int) -> ModelConfig:
    return dataclasses.replace(CFG, head_chunk_tokens=chunk)


@settings(max_examples=4, deadline=None)
@given(chunk=st.sampled_from([1, 2, 4, 8]))
def test_chunked_head_matches_unchunked_in_eval_mode(params, chunk):
    want = SDT(CFG).apply({"params": params}, *_inputs())
    got = SDT(_chunked(chunk)).apply({"params": params}, *_inputs())
    assert float(jnp.abs(want).max()) > 1e-3  # the head is switched on
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [2, 4])
def test_chunked_head_gradients_match(params, chunk):
    def loss(cfg):
        return lambda p: jnp.sum(jnp.square(SDT(cfg).apply({"params": p}, *_inputs())))

    want = jax.grad(loss(CFG))(params)
    got = jax.grad(loss(_chunked(chunk)))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_chunked_head_has_the_same_parameters():
    want, got = _init(CFG), _init(_chunked(2))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert set(got["head"]) == {"patch_adapter", "input_adapter", "time_proj", "adaln",
                                "mixer_0", "mixer_3"}
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype


def test_chunked_head_trains_with_dropout(params):
    out = SDT(_chunked(4), train=True).apply({"params": params}, *_inputs(),
                                             rngs={"dropout": jax.random.key(3)})
    assert out.shape == (BATCH, CFG.seq_bits)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_non_dividing_chunk_is_rejected():
    with pytest.raises(ConfigError, match="head_chunk_tokens"):
        validate(ExperimentConfig(model=_chunked(3)))
    with pytest.raises(ConfigError, match="head_chunk_tokens"):
        validate(ExperimentConfig(model=_chunked(-1)))
    validate(ExperimentConfig(model=_chunked(4)))
    with pytest.raises(ValueError, match="does not divide"):
        SDT(_chunked(3)).init(jax.random.key(1), *_inputs())


def test_bench_bit_path_chunked_matches_and_uses_less_memory():
    from bitgen.bench.heads import head_chunk, head_programs, head_train_fn
    from bitgen.bench.programs import trunk_config
    from bitgen.bench.timing import compiled_memory

    trunk = trunk_config("tiny", dtype="float32")
    cfg, programs = head_programs(trunk, seq_tokens=64, vocab=512, batch=1, chunk_tokens=8)
    assert cfg.head_chunk_tokens == 8 and set(programs) == {"bit", "bit_unchunked", "token"}
    (chunked, args), (unchunked, same_args) = programs["bit"], programs["bit_unchunked"]
    assert same_args is args
    np.testing.assert_allclose(float(jax.jit(chunked)(*args)), float(jax.jit(unchunked)(*args)),
                               rtol=1e-6)
    chunked_mem = compiled_memory(head_train_fn(chunked), args)
    unchunked_mem = compiled_memory(head_train_fn(unchunked), args)
    assert chunked_mem["temp_bytes"] < unchunked_mem["temp_bytes"]
    assert head_chunk(128, 4096) == 128 and head_chunk(128, 96) == 32
    assert head_chunk(0, 4096) == 0
