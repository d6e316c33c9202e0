"""Entropy-rate σ schedule: ring buffer, rebuild gating, σ draws, table files, golden parity."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.config import DiffusionConfig, EntropyScheduleConfig
from bitgen.diffusion import entropy_schedule as es
from bitgen.parity import entropy as entropy_parity

DCFG = DiffusionConfig()
SMALL = EntropyScheduleConfig(buffer_size=16, num_bins=4, min_per_bin=2, update_every=3,
                              warmup_steps=10, transition_steps=10)


def test_golden_parity(reference_dir):
    failed = [r.line() for r in entropy_parity.checks(reference_dir) if not r.passed]
    assert not failed, "\n".join(failed)


@settings(max_examples=10, deadline=None)
@given(capacity=st.integers(1, 6), batches=st.lists(st.integers(1, 8), min_size=1, max_size=4))
def test_ring_buffer_keeps_newest_in_push_order(capacity, batches):
    state = es.init_schedule_state(EntropyScheduleConfig(buffer_size=capacity), DCFG)
    pushed = []
    for n in batches:
        values = np.arange(len(pushed), len(pushed) + n, dtype=np.float32)
        pushed.extend(values.tolist())
        state = es.push_samples(state, values, -values)
    sigma, metric, valid = (np.asarray(a) for a in es.buffer_in_push_order(state))
    expected = pushed[-capacity:]
    assert int(state.size) == len(expected)
    np.testing.assert_array_equal(sigma[valid], expected)
    np.testing.assert_array_equal(metric[valid], -np.asarray(expected))


def test_rebuild_only_when_due_and_full():
    state = es.init_schedule_state(SMALL, DCFG)
    state = es.push_samples(state, jnp.full(7, 0.5), jnp.full(7, 0.1))  # 7 < 4*2 samples
    assert not bool(es.maybe_rebuild(state, 3, SMALL).table_ready)
    state = es.push_samples(state, jnp.full(2, 5.0), jnp.full(2, 0.1))
    assert not bool(es.maybe_rebuild(state, 4, SMALL).table_ready)  # not a multiple of 3
    rebuilt = es.maybe_rebuild(state, 6, SMALL)
    assert bool(rebuilt.table_ready)
    pdf = np.asarray(rebuilt.table.pdf)
    assert pdf.sum() == pytest.approx(1.0, abs=1e-6) and (pdf[[0, 3]] == 0).all()  # empty bins
    assert float(rebuilt.table.cdf[-1]) == 1.0


def test_rebuild_jit_matches_eager_and_degenerate_is_uniform():
    key = jax.random.key(0)
    sig = es.lognormal_draw(key, 500, DCFG)
    met = jax.random.uniform(jax.random.key(1), (500,)) * 0.25
    valid = jnp.arange(500) < 400
    eager, _ = es.rebuild_table(sig, met, valid, es.EntropyScheduleConfig(), DCFG)
    jitted, _ = jax.jit(es.rebuild_table, static_argnums=(3, 4))(sig, met, valid,
                                                                 es.EntropyScheduleConfig(), DCFG)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
    uniform, _ = es.rebuild_table(sig, jnp.zeros(500), valid, es.EntropyScheduleConfig(), DCFG)
    np.testing.assert_allclose(uniform.pdf, 1 / 128, rtol=1e-6)


def test_training_step_does_not_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, key, step):
        sigma = es.draw_training_sigma(state, key, 8, step, SMALL, DCFG)
        state = es.push_samples(state, sigma, jnp.full_like(sigma, 0.1))
        return es.maybe_rebuild(state, step, SMALL), sigma

    state = es.init_schedule_state(SMALL, DCFG)
    for i in range(5):
        state, sigma = step(state, jax.random.key(i), jnp.asarray(i))
    assert bool(state.table_ready) and np.all(np.isfinite(sigma))


def test_lognormal_moments_and_bounds():
    sigma = np.asarray(es.lognormal_draw(jax.random.key(3), 200_000, DCFG))
    assert sigma.min() >= DCFG.sigma_min and sigma.max() <= DCFG.sigma_max
    log_s = np.log(sigma)
    # truncation at about -4.2 / +4.7 std moves the moments by < 1e-3
    assert log_s.mean() == pytest.approx(DCFG.p_mean, abs=0.01)
    assert log_s.std() == pytest.approx(DCFG.p_std, abs=0.01)


def test_entropic_draws_follow_table_pdf():
    table = es.load_entropy_table("lm1b")
    n = 200_000
    sigma, bins = es.entropic_draw(table, jax.random.uniform(jax.random.key(4), (n,)),
                                   jax.random.uniform(jax.random.key(5), (n,)))
    freq = np.bincount(np.asarray(bins), minlength=128) / n
    assert 0.5 * np.abs(freq - table.pdf).sum() < 0.01  # total variation
    sigma = np.asarray(sigma)
    assert np.all((sigma >= table.edges[np.asarray(bins)] * (1 - 1e-6))
                  & (sigma <= table.edges[np.asarray(bins) + 1] * (1 + 1e-6)))


def test_mixture_weight_ramps():
    ready = jnp.asarray(True)
    weights = [float(es.entropic_weight(s, ready, SMALL)) for s in (0, 10, 15, 20, 99)]
    assert weights == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert float(es.entropic_weight(99, jnp.asarray(False), SMALL)) == 0.0


def test_table_files_roundtrip_and_errors(tmp_path):
    table = es.load_entropy_table("owt")
    path = es.save_entropy_table(table, tmp_path / "t.npz")
    chex.assert_trees_all_equal(es.load_entropy_table(path), table)
    (tmp_path / "run").mkdir()
    es.save_entropy_table(table, tmp_path / "run" / "entropy_table.npz")
    chex.assert_trees_all_equal(es.load_entropy_table(tmp_path / "run"), table)
    with pytest.raises(es.EntropyTableError, match="shipped names"):
        es.load_entropy_table("lm1bb")
    bad = tmp_path / "bad.npz"
    np.savez(bad, pdf=np.ones(4), cdf=np.ones(4), sigmas=np.ones(4), edges=np.ones(4))
    with pytest.raises(es.EntropyTableError, match="edges"):
        es.load_entropy_table(bad)
