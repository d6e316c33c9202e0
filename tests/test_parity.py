"""Every parity suite on the vendored golden vectors, the number of checks, and the update rounding."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.parity import SUITES
from bitgen.parity import samplers as samplers_parity
from bitgen.sampling import SamplerSettings, churn_gammas, sample_from_noise, samplers, steps
SHARED_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cobit"

# Checks per suite on the vendored fixtures (docs/parity.md lists each one); 323 in all.
EXPECTED_CHECKS = {"codec": 11, "model": 89, "loss": 24, "entropy": 33, "grids": 24, "samplers": 142}


def test_every_parity_check_runs_and_passes(reference_dir):
    counts, failed = {}, []
    for suite in SUITES:
        results = list(importlib.import_module(f"bitgen.parity.{suite}").checks(reference_dir))
        counts[suite] = len(results)
        failed += [r.line() for r in results if not r.passed]
    assert failed == []
    assert counts == EXPECTED_CHECKS
    assert sum(counts.values()) == 323


def test_vendored_fixtures_match_shared_copy(reference_dir):
    if not SHARED_REFERENCE_DIR.is_dir():
        pytest.skip("../shared is absent in this checkout")
    shared = sorted(p.relative_to(SHARED_REFERENCE_DIR) for p in SHARED_REFERENCE_DIR.rglob("*") if p.is_file())
    vendored = sorted(p.relative_to(reference_dir) for p in reference_dir.rglob("*") if p.is_file())
    assert vendored == shared
    for rel in shared:
        assert (reference_dir / rel).read_bytes() == (SHARED_REFERENCE_DIR / rel).read_bytes(), rel


def test_update_rounds_product_and_sum_separately():
    # numpy rounds h*d, then the sum; XLA would fuse both into one FMA without _rounded.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * 50).astype(np.float32)
    d = rng.standard_normal((64, 256)).astype(np.float32)
    h = np.float32(-37.3)
    got = jax.jit(lambda x, h, d: x + steps._rounded(h * d))(x, h, d)
    np.testing.assert_array_equal(np.asarray(got), x + h * d)
    nan = jax.jit(lambda a, b: steps._rounded(a * b))(jnp.float32(np.inf), jnp.float32(0.0))
    assert np.isnan(nan)


def test_fused_update_breaks_the_derived_bound(reference_dir, monkeypatch):
    # Without _rounded (one rounding for x + h*d, reassociated churn) the Heun replay leaves the
    # bound: the trace checks can fail.
    monkeypatch.setattr(steps, "_rounded", lambda v: v)
    results = [r for r in samplers_parity.checks(reference_dir, with_model=False)
               if r.name.startswith("heun.sto02full.replay.x_")]
    assert results and not all(r.passed for r in results)


@pytest.mark.parametrize("method", ["ddim", "heun"])
def test_update_chain_is_bit_exact_given_reference_D(reference_dir, monkeypatch, method):
    # Feed the reference's own D (its sigmoid) to every call: all remaining arithmetic is bitgen's
    # and must reproduce every state of the trace bit for bit, churn included.
    monkeypatch.setattr(samplers, "_denoise", lambda den, params, x, sigma, x0: den(params, x, sigma, x0))
    data = np.load(reference_dir / f"sampler_{method}.npz")
    for name in ("det", "sto02full", "sto03win"):
        def get(key, name=name):
            return data[f"{name}_{key}"]

        per_step = [get("D_steps")] + ([get("D2_steps")] if method == "heun" else [])
        calls = np.stack(per_step, axis=1).reshape(-1, *get("D_final").shape)
        recorded_D = np.concatenate([calls, get("D_final")[None]])
        grid = get("sigmas")
        window = tuple(get("s_tmin_s_tmax")) if float(get("s_churn")) > 0 else None
        settings = SamplerSettings(method=method, sc_mode="carry", s_noise=1.003, seq_bits=grid.shape[0],
                                   gammas=tuple(churn_gammas(grid, float(get("s_churn")), window)))
        denoiser = samplers_parity.recorded_logits_denoiser(get("model_x"), get("model_sigma"),
                                                            get("model_x0_hat"), recorded_D)
        result = sample_from_noise(None, get("noise_init"), get("noise_churn"), grid=grid,
                                   settings=settings, denoiser=denoiser,
                                   sigma_delta=get("sigma_delta"), return_trace=True)
        traces = [("x_hat", "x_hat"), ("x", "x_steps")] + ([("x_pred", "x_pred")] if method == "heun" else [])
        for ours, theirs in traces:
            np.testing.assert_array_equal(np.asarray(result.trace[ours]), get(theirs), err_msg=f"{name} {theirs}")
        np.testing.assert_array_equal(np.asarray(result.x), get("x_final"))
