"""SDT denoiser: parameter counts, init = matched filter, jit/eager, dropout, bf16, RoPE, parity."""

from __future__ import annotations

from dataclasses import replace

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from bitgen.config import ModelConfig
from bitgen.diffusion.denoiser import (
    count_params,
    denoise,
    init_params,
    matched_filter_llr,
    param_logical_axes,
    param_shapes,
    residual_logits,
    score,
)
from bitgen.nn.attention import Attention, apply_rope
from bitgen.parity import model as model_parity

# The golden-vector model's sizes (P=5, T=6, E=32), with dropout on for the dropout tests.
TINY = ModelConfig(patch_size=5, seq_tokens=6, embed_dim=32, n_heads=2, n_blocks=2, dim_ff=48,
                   content_dim=16, head_hidden=16, dropout=0.1)
# Compiled once per (cfg, train, shapes) and shared by the tests: eager Flax is slow on CPU.
DENOISE = jax.jit(denoise, static_argnames=("cfg", "train"))
RESIDUAL = jax.jit(residual_logits, static_argnames=("cfg", "train", "capture_intermediates"))
LOGICAL_NAMES = {"embed", "mlp", "heads", "patch_in", "content", "head_hidden", "bits", None}


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    """Random params of the right shapes (numpy, nothing compiled): every gate open."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale / np.sqrt(s.shape[0]),
                                              jnp.float32), param_shapes(cfg))


def inputs(cfg: ModelConfig, batch: int = 3, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    bits = jax.random.bernoulli(k1, 0.5, (batch, cfg.seq_bits)).astype(jnp.float32)
    sigma = jnp.exp(jax.random.uniform(k2, (batch,), minval=-3.0, maxval=3.0))
    x_t = bits + sigma[:, None] * jax.random.normal(k3, bits.shape)
    x0_hat = jax.random.uniform(k3, bits.shape)
    return x_t, sigma, x0_hat


@pytest.fixture(scope="module")
def params():
    return random_params(TINY)


@pytest.mark.parametrize("cfg, expected", [
    (ModelConfig(patch_size=15, seq_tokens=128), 133_453_377),  # CoBit-S LM1B
    (ModelConfig(patch_size=16, seq_tokens=1024), 133_755_393),  # CoBit-S OWT
    (ModelConfig(patch_size=16, seq_tokens=1024, embed_dim=1024, n_heads=16, n_blocks=24,
                 dim_ff=4096), 462_100_449),  # CoBit-M OWT
    (TINY, 54_097),
])
def test_parameter_counts_match_official_models(cfg, expected):
    assert count_params(cfg) == expected


def test_model_is_pure_matched_filter_at_init():
    params = init_params(jax.random.key(3), TINY)
    x_t, sigma, x0_hat = inputs(TINY)
    f_theta = RESIDUAL(params, x_t, sigma, x0_hat, cfg=TINY)
    assert np.all(np.asarray(f_theta) == 0.0)
    np.testing.assert_array_equal(DENOISE(params, x_t, sigma, x0_hat, cfg=TINY),
                                  matched_filter_llr(x_t, sigma))


def test_init_params_are_plain_float32_arrays_and_axes_match():
    params = init_params(jax.random.key(0), TINY)
    axes = param_logical_axes(TINY)
    assert jax.tree.structure(params) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
        assert len(spec) == leaf.ndim and set(spec) <= LOGICAL_NAMES


def test_official_parameter_names():
    params = init_params(jax.random.key(0), TINY)
    assert params["blocks_0"]["attn"]["qkv_proj"]["kernel"].shape == (32, 96)
    assert params["blocks_1"]["adaln1"]["mlp_1"]["kernel"].shape == (32, 96)
    assert set(params["head"]) == {"patch_adapter", "input_adapter", "time_proj", "adaln",
                                   "mixer_0", "mixer_3"}
    assert "bias" not in params["time_proj"]


def test_jit_and_eager_agree(params):
    x_t, sigma, x0_hat = inputs(TINY)
    eager = denoise(params, x_t, sigma, x0_hat, cfg=TINY)
    jitted = DENOISE(params, x_t, sigma, x0_hat, cfg=TINY)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)


def test_none_self_conditioning_is_an_uncentred_zero(params):
    """The bootstrap quirk feeds 0 to the SC Linear, which is what x0_hat = 0.5 centres to."""
    x_t, sigma, _ = inputs(TINY)
    none = RESIDUAL(params, x_t, sigma, None, cfg=TINY)
    half = RESIDUAL(params, x_t, sigma, jnp.full_like(x_t, 0.5), cfg=TINY)
    zeros = RESIDUAL(params, x_t, sigma, jnp.zeros_like(x_t), cfg=TINY)
    np.testing.assert_allclose(none, half, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(none - zeros)).max() > 1e-4


def test_dropout_only_in_training_and_deterministic_per_key(params):
    x_t, sigma, x0_hat = inputs(TINY)
    run = DENOISE
    k1, k2 = jax.random.key(1), jax.random.key(2)
    eval_out = run(params, x_t, sigma, x0_hat, cfg=TINY)
    np.testing.assert_array_equal(eval_out, run(params, x_t, sigma, x0_hat, cfg=TINY, key=k1))
    train_1 = run(params, x_t, sigma, x0_hat, cfg=TINY, key=k1, train=True)
    np.testing.assert_array_equal(train_1, run(params, x_t, sigma, x0_hat, cfg=TINY, key=k1, train=True))
    assert np.abs(np.asarray(train_1 - eval_out)).max() > 1e-4
    assert np.abs(np.asarray(train_1 - run(params, x_t, sigma, x0_hat, cfg=TINY, key=k2,
                                           train=True))).max() > 1e-4
    with pytest.raises(ValueError, match="dropout key"):
        denoise(params, x_t, sigma, x0_hat, cfg=TINY, train=True)


def test_bfloat16_compute_is_close_to_float32(params):
    x_t, sigma, x0_hat = inputs(TINY)
    f32 = RESIDUAL(params, x_t, sigma, x0_hat, cfg=TINY)
    bf16 = RESIDUAL(params, x_t, sigma, x0_hat, cfg=replace(TINY, compute_dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    scale = float(jnp.abs(f32).max())
    assert float(jnp.abs(bf16 - f32).max()) < 0.05 * scale


def test_remat_keeps_params_and_outputs(params):
    remat = replace(TINY, remat=True)
    assert jax.tree.structure(param_shapes(remat)) == jax.tree.structure(params)
    x_t, sigma, x0_hat = inputs(TINY)
    np.testing.assert_array_equal(DENOISE(params, x_t, sigma, x0_hat, cfg=remat),
                                  DENOISE(params, x_t, sigma, x0_hat, cfg=TINY))


@pytest.mark.slow
def test_remat_gradients_match():
    cfg = replace(TINY, n_blocks=1)
    params = random_params(cfg)
    x_t, sigma, x0_hat = inputs(cfg)

    def loss(p, cfg):
        return jnp.sum(denoise(p, x_t, sigma, x0_hat, cfg=cfg) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    for a, b in zip(jax.tree.leaves(grad(params, cfg)),
                    jax.tree.leaves(grad(params, replace(cfg, remat=True)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_input_errors_name_the_problem(params):
    x_t, sigma, x0_hat = inputs(TINY)
    with pytest.raises(ValueError, match="multiple of model.patch_size=5"):
        denoise(params, x_t[:, :-1], sigma, None, cfg=TINY)
    with pytest.raises(ValueError, match="sigma must be"):
        denoise(params, x_t, sigma[:2], None, cfg=TINY)
    with pytest.raises(ValueError, match="x0_hat shape"):
        denoise(params, x_t, sigma, x0_hat[:, :10], cfg=TINY)


def test_score_is_tweedie():
    x = jnp.array([[0.3, 1.2]])
    sigma = jnp.array([0.5])
    np.testing.assert_allclose(score(jnp.array([[0.0, 1.0]]), x, sigma), [[-1.2, -0.8]], rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(-50, 50), n=st.integers(-50, 50), shift=st.integers(-1000, 1000))
def test_rope_scores_depend_only_on_relative_position(m, n, shift):
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score_at(i, j):
        return float(jnp.sum(apply_rope(q, jnp.array([i]), 10000.0) * apply_rope(k, jnp.array([j]), 10000.0)))

    assert score_at(m, n) == pytest.approx(score_at(m + shift, n + shift), rel=1e-3, abs=1e-3)


def test_causal_attention_ignores_the_future():
    attn = Attention(n_heads=2, block_size=1, implementation="xla")
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    variables = attn.init(jax.random.key(1), x)
    changed = x.at[:, 4:].set(jax.random.normal(jax.random.key(2), (2, 3, 16)))
    for train in (False, True):  # both kernels: dot_product_attention and explicit softmax
        run = jax.jit(lambda v, train=train: attn.apply(variables, v, train=train,
                                                        rngs={"dropout": jax.random.key(3)})[0])
        out, out_changed = run(x), run(changed)
        np.testing.assert_allclose(out[:, :4], out_changed[:, :4], rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(out[:, 4:] - out_changed[:, 4:])).max() > 1e-3


def test_parity_with_official_model(reference_dir):
    results = list(model_parity.checks(reference_dir))
    failed = [r.line() for r in results if not r.passed]
    assert len(results) > 20 and not failed, "\n".join(failed)
