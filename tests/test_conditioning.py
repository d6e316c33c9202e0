"""Conditioning (``Cond``): clamped bits in the samplers, cond=None is the unconditional program,
and the network behind the denoiser contract is a parameter."""

from __future__ import annotations

import functools

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
from bitgen.diffusion.denoiser import (
    denoise,
    guided_denoise,
    init_params,
    matched_filter_llr,
    param_shapes,
)
from bitgen.diffusion.entropy_schedule import load_entropy_table
from bitgen.sampling import (
    build_sampler,
    build_settings,
    calls_per_step,
    matched_filter_denoiser,
    model_calls,
    nfe_to_grid_points,
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


# ---- classifier-free guidance ---------------------------------------------------------------

class _ToyResidual(nn.Module):
    """A parameter-free network whose residual depends on x_t, σ and x0_hat (every input live)."""

    cfg: ModelConfig
    train: bool = False

    def __call__(self, x_t, sigma, x0_hat):
        return jnp.sin(3.0 * x_t) * sigma[:, None] + 2.0 * x0_hat - 1.0


TOY_GUIDED = functools.partial(guided_denoise, cfg=TINY, network=_ToyResidual)


def _random_params(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3 / np.sqrt(s.shape[0]),
                                              jnp.float32), param_shapes(TINY))


def test_guidance_scale_one_and_zero_are_the_branches():
    # (f) on the tiny SDT: w = 1 is the conditional denoiser exactly; w = 0 is the unconditional
    # one (the network on x_u with its own SC estimate) exactly at every target bit; known bits
    # differ only in the matched filter (x_t vs x_u there), and the samplers clamp them anyway.
    rng = np.random.default_rng(1)
    params = _random_params()
    n = TINY.seq_bits
    mask = rng.random((2, n)) < 0.4
    bits = rng.integers(0, 2, (2, n))
    sigma = jnp.asarray([0.4, 3.0], jnp.float32)
    x_t = jnp.where(mask, bits, 0.5 + sigma[:, None] * rng.normal(size=(2, n))).astype(jnp.float32)
    x0_c, x0_u = (jnp.asarray(rng.random((2, n)), jnp.float32) for _ in range(2))
    eps = jnp.asarray(rng.normal(size=(2, n)), jnp.float32)
    cond = Cond.clamped(mask, bits)
    run = jax.jit(lambda w: guided_denoise(params, x_t, sigma, (x0_c, x0_u), cfg=TINY,
                                           cond=cond.replace(guidance=w, guidance_noise=eps)))
    conditional = jax.jit(lambda: denoise(params, x_t, sigma, x0_c, cfg=TINY, cond=cond))()
    x_u = jnp.where(mask, bits + sigma[:, None] * eps, x_t)
    unconditional = jax.jit(lambda: denoise(params, x_u, sigma, x0_u, cfg=TINY))()
    one, zero = run(jnp.float32(1.0)), run(jnp.float32(0.0))
    np.testing.assert_array_equal(one.guided, conditional)
    np.testing.assert_array_equal(one.conditional, conditional)
    np.testing.assert_array_equal(one.unconditional, unconditional)
    np.testing.assert_array_equal(np.asarray(zero.guided)[~mask], np.asarray(unconditional)[~mask])
    per_row = run(jnp.asarray([1.0, 0.0], jnp.float32))  # a scale per row
    np.testing.assert_array_equal(per_row.guided[0], conditional[0])
    np.testing.assert_array_equal(np.asarray(per_row.guided[1])[~mask[1]],
                                  np.asarray(unconditional[1])[~mask[1]])
    # w = 3: the residual is extrapolated, the matched filter is not: guided − mf(x_t) equals
    # f_u + 3(f_c − f_u) computed from the branches (each f recovered as logits − mf).
    three = run(jnp.float32(3.0))
    mf_t = matched_filter_llr(x_t, sigma, TINY.mf_clip)
    mf_u = matched_filter_llr(x_u, sigma, TINY.mf_clip)
    f_c, f_u = np.asarray(three.conditional - mf_t), np.asarray(three.unconditional - mf_u)
    # M bounds every intermediate's magnitude (the mf is clipped at 30). The guided side takes
    # 4 roundings (two products, the sum, + mf) and the test's − mf one more; the expected side
    # 2 (the recovered f's) + 3 (×2, ×3, the sum): |Δ| ≤ 10·u·M with u = 2⁻²⁴.
    scale = float(TINY.mf_clip + 3 * np.max(np.abs(f_c)) + 2 * np.max(np.abs(f_u))
                  + np.max(np.abs(three.guided)))
    np.testing.assert_allclose(np.asarray(three.guided - mf_t), -2.0 * f_u + 3.0 * f_c,
                               atol=10 * scale * 2.0**-24, rtol=0)


def _guided_settings(method, sc_mode, gamma, guided=True):
    cfg = SamplerConfig(name=method, sc_mode=sc_mode, gamma=gamma, nfe=GRID.shape[0] + 1,
                        ati_eta=0.3)
    return build_settings(cfg, GRID, seq_bits=S, table=LM1B, guided=guided)


@settings(max_examples=16, deadline=None)
@given(method=st.sampled_from(METHODS), gamma=st.sampled_from([0.0, 0.3]),
       mask=hnp.arrays(bool, (B, S)), bits=hnp.arrays(np.uint8, (B, S), elements=st.integers(0, 1)),
       w=st.floats(-1.0, 4.0, width=32), seed=st.integers(0, 2**16))
def test_clamped_bits_stay_clean_under_guidance(method, gamma, mask, bits, w, seed):
    # (g) the property of test_clamped_bits_stay_clean_in_every_state, for guided samplers.
    cond = Cond.clamped(mask, bits, guidance=jnp.float32(w))
    result = _draw(_guided_settings(*method, gamma), cond, seed, denoiser=TOY_GUIDED, params={})
    want = bits[mask].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(result.bits)[mask], bits[mask])
    np.testing.assert_array_equal(np.asarray(result.x)[mask], want)
    for name, per_step in result.trace.items():
        if name == "x0_hat_uncond_in":  # the unconditional branch has no clamped bits
            continue
        if name == "x0_hat_in":
            per_step = per_step[1:]
        for i, state in enumerate(np.asarray(per_step)):
            np.testing.assert_array_equal(state[mask], want, err_msg=f"{name} at step {i}")


@pytest.mark.parametrize("method,sc_mode", METHODS)
def test_guided_sampler_at_scale_one_is_the_conditional_sampler(method, sc_mode):
    rng = np.random.default_rng(2)
    mask, bits = rng.random((B, S)) < 0.5, rng.integers(0, 2, (B, S))
    plain = functools.partial(denoise, cfg=TINY, network=_ToyResidual)
    # Op by op: the identity is exact in every float32 operation, while two compiled programs may
    # fuse the network's elementwise chain differently (one FMA contraction is 1 ulp).
    with jax.disable_jit():
        conditional = _draw(_settings(method, sc_mode, 0.3), Cond.clamped(mask, bits), 4,
                            denoiser=plain, params={})
        guided = _draw(_guided_settings(method, sc_mode, 0.3),
                       Cond.clamped(mask, bits, guidance=jnp.float32(1.0)), 4, denoiser=TOY_GUIDED,
                       params={})
    for name in ("bits", "D", "x"):
        np.testing.assert_array_equal(getattr(guided, name), getattr(conditional, name))
    np.testing.assert_array_equal(guided.trace["x0_hat_in"], conditional.trace["x0_hat_in"])
    steered = _draw(_guided_settings(method, sc_mode, 0.3),
                    Cond.clamped(mask, bits, guidance=jnp.float32(3.0)), 4, denoiser=TOY_GUIDED,
                    params={})
    # the scale does act (the final D saturates at the terminal σ; the per-step D does not)
    assert not np.array_equal(steered.trace["D"], conditional.trace["D"])


@pytest.mark.parametrize("method,sc_mode", METHODS)
def test_guided_steps_declare_two_calls_per_denoise(method, sc_mode):
    calls = []

    def counting(params, x, sigma, x0_hat, *, cond):
        calls.append(1)
        return TOY_GUIDED(params, x, sigma, x0_hat, cond=cond)

    plain, guided = (_guided_settings(method, sc_mode, 0.0, g) for g in (False, True))
    result = _draw(guided, Cond.clamped(np.ones((B, S), bool), np.ones((B, S)), guidance=2.0),
                   denoiser=counting, params={})
    # The scan body is traced once: traced calls = denoises per step + the final one, each two
    # network passes.
    assert 2 * len(calls) == guided.step.calls_per_step + 2
    assert result.nfe == guided.nfe == 2 * plain.nfe
    assert guided.nfe == model_calls(GRID.shape[0], method, sc_mode, True)
    assert calls_per_step(method, sc_mode, True) == 2 * calls_per_step(method, sc_mode)


def test_sdt_guided_sampler_and_errors():
    params = _random_params()
    sampler_cfg = SamplerConfig(nfe=9, batch_size=2, gamma=0.3)
    guided = build_sampler(TINY, sampler_cfg, LM1B, TINY.seq_bits, DiffusionConfig(), guided=True)
    plain = build_sampler(TINY, sampler_cfg, LM1B, TINY.seq_bits, DiffusionConfig())
    assert len(guided.grid) == nfe_to_grid_points(9, "ddim", "carry", True) == 4
    assert guided.settings.nfe <= 9 and plain.settings.nfe <= 9
    rng = np.random.default_rng(3)
    mask, bits = rng.random((2, TINY.seq_bits)) < 0.5, rng.integers(0, 2, (2, TINY.seq_bits))
    steer = Cond.clamped(mask, bits, guidance=jnp.float32(2.0))
    out = guided(params, jax.random.key(0), cond=steer)
    np.testing.assert_array_equal(np.asarray(out.bits)[mask], bits[mask])
    with pytest.raises(CondError, match="guided=True"):
        plain(params, jax.random.key(0), cond=steer)
    with pytest.raises(CondError, match="guidance=w"):
        guided(params, jax.random.key(0), cond=Cond.clamped(mask, bits))
    with pytest.raises(CondError, match="embedding"):
        guided_denoise(params, jnp.zeros((2, TINY.seq_bits)), jnp.ones(2), (None, None), cfg=TINY,
                       cond=Cond(embedding=jnp.ones((2, 1)), guidance=1.0))
