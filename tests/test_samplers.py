"""Samplers: golden traces, the matched-filter denoiser, NFE accounting, keys and tracing."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.config import DiffusionConfig, ModelConfig, SamplerConfig
from bitgen.diffusion import grids
from bitgen.diffusion.entropy_schedule import load_entropy_table
from bitgen.parity import samplers as samplers_parity
from bitgen.sampling import steps
from bitgen.diffusion.denoiser import param_shapes
from bitgen.sampling import (
    EulerStep,
    HeunStep,
    SamplerSettings,
    build_sampler,
    build_settings,
    integrate,
    matched_filter_denoiser,
    sample,
    sample_from_noise,
    sdt_denoiser,
    step_schedule,
)
from bitgen.sampling.steps import initial_state

LM1B = load_entropy_table("lm1b")
GRID = jnp.asarray(grids.entropic_grid(LM1B, 12, 0.08, 80.0))
S = 20


def _settings(method="ddim", sc_mode="carry", gamma=0.2, **kw):
    cfg = SamplerConfig(name=method, sc_mode=sc_mode, gamma=gamma, nfe=13, **kw)
    return build_settings(cfg, np.asarray(GRID), seq_bits=S, table=LM1B)


def test_golden_replay(reference_dir):
    failed = [r.line() for r in samplers_parity.checks(reference_dir, with_model=False)
              if not r.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.slow
def test_golden_with_model(reference_dir):
    failed = [r.line() for r in samplers_parity.checks(reference_dir) if not r.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("method,sc_mode", [("ddim", "carry"), ("heun", "carry"),
                                            ("ddim", "refined")])
def test_matched_filter_sampler_is_sane(method, sc_mode):
    settings = _settings(method, sc_mode, ati_eta=0.3 if sc_mode == "refined" else 0.0)
    kw = {"batch": 4, "grid": GRID, "settings": settings, "denoiser": matched_filter_denoiser}
    a = sample(None, jax.random.key(0), **kw)
    b = sample(None, jax.random.key(0), **kw)
    c = sample(None, jax.random.key(1), **kw)
    chex.assert_shape([a.bits, a.D, a.x], (4, S))
    assert a.bits.dtype == jnp.uint8 and set(np.unique(a.bits)) <= {0, 1}
    chex.assert_tree_all_finite((a.D, a.x))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a.x, c.x)
    # at the terminal σ the matched filter is confident: bits agree with the state
    np.testing.assert_array_equal(a.bits, (np.asarray(a.x) > 0.5).astype(np.uint8))


def test_deterministic_sampler_depends_on_key_only_through_init():
    settings = _settings(gamma=0.0)
    assert not settings.stochastic
    key = jax.random.key(7)
    keyed = sample(None, key, batch=3, grid=GRID, settings=settings,
                   denoiser=matched_filter_denoiser)
    init = jax.random.normal(jax.random.split(key)[0], (3, S))
    junk = jax.random.normal(jax.random.key(99), (GRID.shape[0] - 1, 3, S))
    replayed = sample_from_noise(None, init, junk, grid=GRID, settings=settings,
                                 denoiser=matched_filter_denoiser)
    # separate compilations may contract different multiply-adds: equal up to float32 rounding
    chex.assert_trees_all_close(keyed.x, replayed.x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,sc_mode", [("ddim", "carry"), ("heun", "refined")])
def test_nfe_matches_traced_calls_and_no_retrace(method, sc_mode):
    calls = []
    chex.clear_trace_counter()  # the counter is keyed by name and shared across parametrizations

    @chex.assert_max_traces(n=steps.calls_per_step(method, sc_mode) + 1)
    def counting(params, x, sigma, x0_hat):
        calls.append(1)
        return matched_filter_denoiser(params, x, sigma, x0_hat)

    settings = _settings(method, sc_mode)
    for seed in range(3):  # later calls hit the compile cache (assert_max_traces would raise)
        result = sample(None, jax.random.key(seed), batch=2, grid=GRID, settings=settings,
                        denoiser=counting)
    # the scan body is traced once, so trace-time calls = calls per step + the final denoise
    assert len(calls) == steps.calls_per_step(method, sc_mode) + 1
    assert result.nfe == steps.model_calls(GRID.shape[0], method, sc_mode)


def test_churn_gating_and_settings_validation():
    full = _settings(gamma=0.2)
    assert all(g == pytest.approx(0.2 * 12 / 11) for g in full.gammas)
    window = _settings(gamma=0.2, window_q=(0.1, 0.9))
    lo, hi = grids.churn_window(LM1B, 0.1, 0.9, 0.08, 80.0)
    expected = [(lo <= float(s) <= hi) for s in np.asarray(GRID)[:-1]]
    assert [g > 0 for g in window.gammas] == expected
    with pytest.raises(ValueError, match="points"):
        sample(None, jax.random.key(0), batch=1, grid=GRID[:5], settings=full,
               denoiser=matched_filter_denoiser)
    with pytest.raises(ValueError, match="sampler/sc_mode"):
        SamplerSettings(method="euler", sc_mode="carry", gammas=())


def test_build_sampler_end_to_end():
    model_cfg = ModelConfig(patch_size=5, seq_tokens=4)
    draw = build_sampler(model_cfg, SamplerConfig(nfe=9, batch_size=2), LM1B, model_cfg.seq_bits,
                         DiffusionConfig(), denoiser=matched_filter_denoiser)
    result = draw(None, jax.random.key(0))
    assert result.bits.shape == (2, 20) and result.nfe == 8 and draw.grid.shape == (8,)


def test_step_objects_declare_their_calls():
    assert (EulerStep().calls_per_step, EulerStep(refine_sc=True).calls_per_step) == (1, 2)
    assert (HeunStep().calls_per_step, HeunStep(refine_sc=True).calls_per_step) == (2, 3)
    assert _settings("heun", "refined").step == HeunStep(refine_sc=True)


TINY = ModelConfig(patch_size=4, seq_tokens=5, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=24,
                   content_dim=4, head_hidden=8, dropout=0.0)


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
@pytest.mark.parametrize("method,sc_mode", [("ddim", "refined"), ("heun", "carry")])
def test_driver_runs_unjitted_and_equals_the_jitted_sampler(method, sc_mode):
    # Two per-step schedule constants are a product plus a sum that XLA may contract into one
    # fused multiply-add when jitted (one rounding fewer than eager): the churn std δ from
    # σ̂² − σ², passed in here, and the ATI label ln σ + η·(…), left off (η = 0). Every other
    # operation is the same float32 operation eager or compiled (the rounding guards keep XLA
    # from fusing the updates), so the results are equal bit for bit: with every op run eagerly
    # (disable_jit) for the matched filter, and with the scan compiled but the driver not jitted
    # for a tiny SDT.
    settings = _settings(method, sc_mode, gamma=0.3)
    delta = step_schedule(GRID, settings).sigma_delta
    noise_init = jax.random.normal(jax.random.key(1), (2, S))
    noise_churn = jax.random.normal(jax.random.key(2), (GRID.shape[0] - 1, 2, S))
    rng = np.random.default_rng(0)
    tiny_params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3 / np.sqrt(s.shape[0]), jnp.float32),
        param_shapes(TINY))
    for params, denoiser, no_jit in [(None, matched_filter_denoiser, True),
                                     (tiny_params, sdt_denoiser(TINY), False)]:
        jitted = sample_from_noise(params, noise_init, noise_churn, grid=GRID, settings=settings,
                                   denoiser=denoiser, sigma_delta=delta, return_trace=True)
        with jax.disable_jit(no_jit):
            eager = integrate(params, initial_state(noise_init, GRID[0]), GRID, settings, denoiser,
                              noise_churn=noise_churn, sigma_delta=delta, return_trace=True)
        chex.assert_trees_all_equal(jitted, eager)
