"""Diffusion loss: weights, hand-checkable values, gradients, self-conditioning, parity."""

from __future__ import annotations

from dataclasses import replace

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from bitgen.config import DiffusionConfig, ModelConfig
from bitgen.diffusion.denoiser import denoise, param_shapes
from bitgen.diffusion.loss import (
    diffusion_loss,
    loss_from_logits,
    loss_weight,
    self_conditioning_input,
)
from bitgen.parity import loss as loss_parity

CFG = ModelConfig(patch_size=4, seq_tokens=3, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=24,
                  content_dim=4, head_hidden=8, dropout=0.1)
DIFF = DiffusionConfig()
LOSS = jax.jit(diffusion_loss, static_argnames=("model_cfg", "diffusion_cfg", "train"))


@pytest.fixture(scope="module")
def params():
    """Random params of the right shapes (no compiled init): every gate open, every path live."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3 / np.sqrt(s.shape[0]),
                                              jnp.float32), param_shapes(CFG))


@pytest.fixture(scope="module")
def batch():
    k1, k2 = jax.random.split(jax.random.key(5))
    bits = jax.random.bernoulli(k1, 0.5, (4, CFG.seq_bits)).astype(jnp.uint8)
    sigma = jnp.exp(jax.random.uniform(k2, (4,), minval=-2.0, maxval=2.0))
    return bits, sigma


@settings(max_examples=30, deadline=None)
@given(st.floats(1e-3, 1e3))
def test_edm_weight_is_inverse_sigma2_plus_four(sigma):
    weight = loss_weight(jnp.array([sigma], jnp.float32), weighting="edm", sigma_data=0.5)
    s = float(np.float32(sigma))
    assert float(weight[0]) == pytest.approx(1 / s**2 + 4, rel=1e-5)


def test_hand_checkable_values_at_zero_logit():
    logits = jnp.zeros((2, 3))
    bits = jnp.array([[0, 1, 1], [1, 0, 0]], jnp.uint8)
    sigma = jnp.array([1.0, 0.5])
    weights = np.array([5.0, 8.0])  # 1/σ² + 4
    sm, aux = loss_from_logits(logits, bits, sigma, loss_type="binary_sm", weighting="edm", sigma_data=0.5)
    assert float(sm) == pytest.approx(0.25 * weights.mean(), rel=1e-6)
    np.testing.assert_allclose(aux["mse_per_sample"], [0.25, 0.25])
    np.testing.assert_allclose(aux["loss_per_sample"], 0.25 * weights, rtol=1e-6)
    ce, _ = loss_from_logits(logits, bits, sigma, loss_type="binary_ce", weighting="unit", sigma_data=0.5)
    assert float(ce) == pytest.approx(np.log(2.0), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=4, max_size=4), st.lists(st.integers(0, 1), min_size=4, max_size=4))
def test_binary_ce_matches_log_likelihood(logits, bits):
    x = np.asarray(logits, np.float64)
    b = np.asarray(bits, np.float64)
    log_p1 = -np.logaddexp(0.0, -x)
    log_p0 = -np.logaddexp(0.0, x)
    want = -np.mean(b * log_p1 + (1 - b) * log_p0)
    got, _ = loss_from_logits(jnp.asarray([logits], jnp.float32), jnp.asarray([bits], jnp.uint8),
                              jnp.ones(1), loss_type="binary_ce", weighting="unit", sigma_data=0.5)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_gradients_finite_with_dropout_and_self_conditioning(params, batch):
    bits, sigma = batch
    grad = jax.jit(jax.grad(lambda p: diffusion_loss(p, bits, sigma, jax.random.key(2), model_cfg=CFG,
                                                     diffusion_cfg=DIFF)[0]))(params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)]
    assert all(np.isfinite(norms)) and max(norms) > 0


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_self_conditioning_pass_carries_no_gradient(params, batch):
    """The gradient equals the one of an explicit construction whose x0_hat is a constant."""
    bits, sigma = batch
    sc_mask = jnp.array([True, False, True, True])
    noise = jax.random.normal(jax.random.key(9), bits.shape)
    x_t = sigma[:, None] * noise + bits.astype(jnp.float32)

    def explicit(p, x0_hat):
        logits = denoise(p, x_t, sigma, x0_hat, cfg=CFG)
        return loss_from_logits(logits, bits, sigma, loss_type="binary_sm", weighting="edm",
                                sigma_data=0.5)[0]

    def pipeline(p):
        return diffusion_loss(p, bits, sigma, jax.random.key(0), model_cfg=CFG, diffusion_cfg=DIFF,
                              train=False, sc_mask=sc_mask, noise=noise)[0]

    x0_const = self_conditioning_input(params, x_t, sigma, sc_mask, cfg=CFG, train=False)
    want = jax.jit(jax.grad(explicit))(params, x0_const)
    got = jax.jit(jax.grad(pipeline))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # The bootstrap estimate really depends on the parameters, so a leak would change the grad.
    assert float(jnp.abs(x0_const - jnp.where(sc_mask[:, None], 0.5, 0.0)).max()) > 1e-3


def test_no_self_conditioning_feeds_zeros(params, batch):
    bits, sigma = batch
    noise = jax.random.normal(jax.random.key(4), bits.shape)
    off = replace(DIFF, self_condition_prob=0.0)
    loss, aux = LOSS(params, bits, sigma, jax.random.key(0), model_cfg=CFG, diffusion_cfg=off,
                     train=False, noise=noise)
    assert not bool(aux["sc_mask"].any())
    masked, _ = LOSS(params, bits, sigma, jax.random.key(0), model_cfg=CFG, diffusion_cfg=DIFF,
                     train=False, noise=noise, sc_mask=jnp.zeros(4, bool))
    assert float(loss) == pytest.approx(float(masked), rel=1e-6)


def test_metric_does_not_depend_on_loss_variant(batch):
    bits, sigma = batch
    logits = 3.0 * jax.random.normal(jax.random.key(3), bits.shape)
    metrics = []
    for loss_type in ("binary_sm", "binary_ce"):
        for weighting in ("edm", "unit"):
            loss, aux = loss_from_logits(logits, bits, sigma, loss_type=loss_type,
                                         weighting=weighting, sigma_data=0.5)
            assert aux["loss_per_sample"].shape == (4,)
            assert float(loss) == pytest.approx(float(aux["loss_per_sample"].mean()), rel=1e-5)
            metrics.append(np.asarray(aux["mse_per_sample"]))
    for m in metrics[1:]:
        np.testing.assert_array_equal(m, metrics[0])


def test_bad_loss_settings_are_named():
    with pytest.raises(ValueError, match="loss_type='l2'"):
        loss_from_logits(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), loss_type="l2",
                         weighting="edm", sigma_data=0.5)
    with pytest.raises(ValueError, match="loss_weighting='snr'"):
        loss_weight(jnp.ones(1), weighting="snr", sigma_data=0.5)


def test_parity_with_official_loss(reference_dir):
    results = list(loss_parity.checks(reference_dir))
    failed = [r.line() for r in results if not r.passed]
    assert len(results) >= 20 and not failed, "\n".join(failed)
