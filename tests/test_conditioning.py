"""Conditioning (``Cond``): clamped bits in the samplers, cond=None is the unconditional program,
and the network behind the denoiser contract is a parameter."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bitgen.config import DiffusionConfig, ModelConfig, SamplerConfig
from bitgen.diffusion import grids
from bitgen.diffusion.cond import Cond, CondError
from bitgen.diffusion.denoiser import denoise, init_params, matched_filter_llr, param_shapes
from bitgen.diffusion.entropy_schedule import load_entropy_table
from bitgen.sampling import (
    build_sampler,
    build_settings,
    matched_filter_denoiser,
    sample,
    sdt_denoiser,
)

LM1B = load_entropy_table("lm1b")
GRID = np.asarray(grids.entropic_grid(LM1B, 8, 0.08, 80.0))
B, S = 3, 20
METHODS = [("ddim", "carry"), ("heun", "carry"), ("ddim", "refined"), ("heun", "refined")]
TINY = ModelConfig(patch_size=4, seq_tokens=5, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=24,
                   content_dim=4, head_hidden=8, dropout=0.0)


def _settings(method, sc_mode, gamma, seq_bits=S):
    cfg = SamplerConfig(name=method, sc_mode=sc_mode, gamma=gamma, nfe=GRID.shape[0] + 1,
                        ati_eta=0.3)
    return build_settings(cfg, GRID, seq_bits=seq_bits, table=LM1B)


def _draw(settings, cond, seed=0, denoiser=matched_filter_denoiser, params=None, batch=B):
    return sample(params, jax.random.key(seed), batch=batch, grid=jnp.asarray(GRID),
                  settings=settings, denoiser=denoiser, cond=cond, return_trace=True)


@settings(max_examples=24, deadline=None)
@given(method=st.sampled_from(METHODS), gamma=st.sampled_from([0.0, 0.3]),
       mask=hnp.arrays(bool, (B, S)), bits=hnp.arrays(np.uint8, (B, S), elements=st.integers(0, 1)),
       seed=st.integers(0, 2**16))
def test_clamped_bits_stay_clean_in_every_state(method, gamma, mask, bits, seed):
    result = _draw(_settings(*method, gamma), Cond.clamped(mask, bits), seed)
    want = bits[mask].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(result.bits)[mask], bits[mask])
    np.testing.assert_array_equal(np.asarray(result.x)[mask], want)
    np.testing.assert_array_equal(np.asarray(result.D)[mask], want)
    for name, per_step in result.trace.items():
        if name == "x0_hat_in":  # step 0 has no self-conditioning estimate (zeros), as without cond
            per_step = per_step[1:]
        for i, state in enumerate(np.asarray(per_step)):
            np.testing.assert_array_equal(state[mask], want, err_msg=f"{name} at step {i}")


@pytest.mark.parametrize("method,sc_mode", METHODS)
def test_all_false_mask_and_empty_cond_equal_no_cond(method, sc_mode):
    settings = _settings(method, sc_mode, 0.3)
    plain = _draw(settings, None, seed=3)
    nothing_clamped = _draw(settings, Cond.clamped(np.zeros((B, S), bool), np.ones((B, S))), seed=3)
    empty = _draw(settings, Cond(), seed=3)
    jax.tree.map(np.testing.assert_array_equal, plain, nothing_clamped)
    jax.tree.map(np.testing.assert_array_equal, plain, empty)


def test_cond_none_program_has_no_conditioning_ops():
    # A Cond without a mask must add no operation: the traced program equals cond=None's.
    settings = _settings("heun", "refined", 0.3)

    def program(cond):
        return str(jax.make_jaxpr(lambda k: sample(
            None, k, batch=B, grid=jnp.asarray(GRID), settings=settings,
            denoiser=matched_filter_denoiser, cond=cond))(jax.random.key(0)))

    assert program(None) == program(Cond())
    assert program(None) != program(Cond.clamped(np.zeros((B, S), bool), np.zeros((B, S))))


def test_sdt_sampler_with_cond():
    # The real denoiser path: build_sampler's draw takes cond; all-False equals None bit for bit.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3 / np.sqrt(s.shape[0]),
                                                jnp.float32), param_shapes(TINY))
    draw = build_sampler(TINY, SamplerConfig(nfe=6, batch_size=2, gamma=0.3), LM1B, TINY.seq_bits,
                         DiffusionConfig())
    mask = rng.random((2, TINY.seq_bits)) < 0.5
    bits = rng.integers(0, 2, (2, TINY.seq_bits))
    plain = draw(params, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, plain,
                 draw(params, jax.random.key(1), cond=Cond.clamped(np.zeros_like(mask), bits)))
    clamped = draw(params, jax.random.key(1), cond=Cond.clamped(mask, bits))
    np.testing.assert_array_equal(np.asarray(clamped.bits)[mask], bits[mask])


class _ZeroResidual(nn.Module):
    """A network with no parameters and f_θ = 0: the denoiser is then the matched filter."""

    cfg: ModelConfig
    train: bool = False

    def __call__(self, x_t, sigma, x0_hat):
        return jnp.zeros_like(x_t)


class _EmbeddingResidual(nn.Module):
    """f_θ = the per-row embedding value on every bit (a network that conditions on one)."""

    cfg: ModelConfig
    train: bool = False

    def __call__(self, x_t, sigma, x0_hat, embedding):
        return jnp.broadcast_to(embedding[:, :1], x_t.shape)


def test_network_is_a_parameter_of_the_denoiser():
    x = 0.5 + jax.random.normal(jax.random.key(0), (2, TINY.seq_bits))
    sigma = jnp.array([0.3, 2.0])
    mf = matched_filter_llr(x, sigma, TINY.mf_clip)
    zero = denoise({}, x, sigma, jnp.zeros_like(x), cfg=TINY, network=_ZeroResidual)
    np.testing.assert_array_equal(zero, mf)  # 0 + mf is mf exactly
    embedding = jnp.array([[1.5], [-2.0]])
    shifted = denoise({}, x, sigma, jnp.zeros_like(x), cfg=TINY, network=_EmbeddingResidual,
                      cond=Cond(embedding=embedding))
    np.testing.assert_array_equal(shifted, embedding + mf)  # one float32 add, as combine_logits
    assert init_params(jax.random.key(0), TINY, _ZeroResidual) == {}


def test_conditioning_errors_name_the_fix():
    x = jnp.full((1, TINY.seq_bits), 0.5)
    params = param_shapes(TINY)
    with pytest.raises(CondError, match="takes no embedding"):
        jax.eval_shape(lambda p: denoise(p, x, jnp.ones(1), x, cfg=TINY,
                                         cond=Cond(embedding=jnp.ones((1, 4)))), params)
    with pytest.raises(CondError, match="guidance"):
        denoise(params, x, jnp.ones(1), x, cfg=TINY, cond=Cond(guidance=jnp.float32(2.0)))
    with pytest.raises(CondError, match="batch, bits"):
        Cond.clamped(np.zeros((2, 3), bool), np.zeros((2, 4)))
    with pytest.raises(CondError, match="must match the state"):
        Cond.clamped(np.zeros((2, 3), bool), np.zeros((2, 3))).clamp(jnp.zeros((2, 4)))
