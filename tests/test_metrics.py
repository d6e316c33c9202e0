"""Evaluation metrics (cobit-spec §6): entropy, GenPPL weighting and bucketing, windowed NLL, VLB."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.eval import metrics

# ---------------------------------------------------------------------------------------------
# Unigram entropy


@given(k=st.integers(1, 50), repeats=st.integers(1, 5))
def test_entropy_of_uniform_sample_is_log_k(k, repeats):
    tokens = np.repeat(np.arange(k) * 7 + 3, repeats)
    assert metrics.unigram_entropy(tokens) == pytest.approx(math.log(k), abs=1e-12)


def test_entropy_hand_values_and_ragged_mean():
    assert metrics.unigram_entropy([5, 5, 5, 5]) == 0.0
    # p = (1/2, 1/4, 1/4): H = ½ ln 2 + ½ ln 4 = 1.5 ln 2
    assert metrics.unigram_entropy([1, 1, 2, 3]) == pytest.approx(1.5 * math.log(2))
    samples = [[9], [1, 2], [4, 4, 6, 7]]  # ragged: 0, ln 2, 1.5 ln 2
    assert metrics.mean_unigram_entropy(samples) == pytest.approx((0 + math.log(2) + 1.5 * math.log(2)) / 3)
    with pytest.raises(ValueError, match="empty"):
        metrics.unigram_entropy([])


# ---------------------------------------------------------------------------------------------
# Windowed NLL and GenPPL


def bigram_logits_fn(table: np.ndarray):
    """A causal 'model' whose logits at t depend only on token t: logits = table[ids]."""
    return lambda ids: jnp.asarray(table)[ids]


def bigram_nll_direct(table: np.ndarray, tokens, window: int) -> tuple[float, int]:
    """Independent loop: sum of −log p(x_t | x_{t−1}) for t not at a window start."""
    log_p = table - np.log(np.exp(table).sum(-1, keepdims=True))
    nll, n = 0.0, 0
    for t in range(1, len(tokens)):
        if t % window:
            nll -= log_p[tokens[t - 1], tokens[t]]
            n += 1
    return nll, n


TABLE = np.random.default_rng(0).standard_normal((13, 13))


_windowed_bigram_nll = jax.jit(
    lambda ids, mask, window: metrics.windowed_sequence_nll(bigram_logits_fn(TABLE), ids, mask, window=window),
    static_argnums=2,
)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), min_size=3, max_size=3), window=st.sampled_from([3, 8]),
       seed=st.integers(0, 99))
def test_windowed_nll_matches_direct_loop(lengths, window, seed):
    ids = np.random.default_rng(seed).integers(0, 13, (3, 21)).astype(np.int32)
    mask = np.arange(21)[None] < np.array(lengths)[:, None]
    nll, n = _windowed_bigram_nll(jnp.asarray(ids), jnp.asarray(mask), window)
    for row, row_len in enumerate(lengths):
        want_nll, want_n = bigram_nll_direct(TABLE, ids[row, :row_len], window)
        assert int(n[row]) == want_n
        assert float(nll[row]) == pytest.approx(want_nll, rel=1e-5, abs=1e-5)


def test_gen_ppl_is_token_weighted_and_compiles_once_per_bucket():
    window = 16
    texts = ["a b c", "c a b a b c c a b a b c a b a b c a b c b a", "b", "a c"]
    vocab = {"a": 1, "b": 2, "c": 3}
    encode = lambda text: [vocab[w] for w in text.split()]
    calls = []

    def score(ids, mask):
        calls.append(ids.shape)
        return _windowed_bigram_nll(ids, mask, window)

    result = metrics.gen_ppl(texts, encode, score, window=window, min_bucket=4)
    per_text = [bigram_nll_direct(TABLE, encode(t), window) for t in texts]
    total_nll = sum(p[0] for p in per_text)
    total_n = sum(p[1] for p in per_text)
    assert result.n_tokens == total_n == 2 + 21 - 1 + 0 + 1  # the 22-token text loses a window start
    assert result.ppl == pytest.approx(math.exp(total_nll / total_n), rel=1e-5)
    # Not the mean of per-text perplexities.
    per_text_ppl = [math.exp(a / b) for a, b in per_text if b]
    assert result.ppl != pytest.approx(np.mean(per_text_ppl), rel=1e-3)
    np.testing.assert_array_equal(result.sample_tokens, [p[1] for p in per_text])
    # Every call scores one text at a bucketed length: 4 (the three short texts) and 32.
    assert sorted(calls) == [(1, 4), (1, 4), (1, 4), (1, 32)]


def test_bucket_length():
    assert [metrics.bucket_length(n, window=1024) for n in (0, 1, 64, 65, 500, 1024, 1025)] == \
        [64, 64, 64, 128, 512, 1024, 2048]
    assert metrics.bucket_length(3, window=16, min_bucket=32) == 16


def test_gen_ppl_rejects_unscorable_input():
    score = lambda ids, mask: (jnp.zeros(ids.shape[0]), jnp.zeros(ids.shape[0], jnp.int32))
    with pytest.raises(ValueError, match="two or more tokens"):
        metrics.gen_ppl(["x"], lambda t: [1], score, window=8)


# ---------------------------------------------------------------------------------------------
# VLB


def matched_filter_denoiser(params, x, sigma, x0_hat):
    """The analytic independent-bit posterior logit clip((x−½)/σ², ±30) (spec §3); ignores params."""
    del params, x0_hat
    return jnp.clip((x - 0.5) / sigma[:, None] ** 2, -30.0, 30.0)


def numpy_vlb(bits, eps_recon, log_sigma, eps_diff, sigma0=0.08, sigma_max=80.0):
    x0 = bits.astype(np.float64)
    logit = np.clip((x0 + sigma0 * eps_recon - 0.5) / sigma0**2, -30, 30)
    p = 1 / (1 + np.exp(-logit))
    recon = -(x0 * np.log(p) + (1 - x0) * np.log1p(-p)).sum(1)
    sigma = np.exp(log_sigma)
    x = x0 + sigma[:, None] * eps_diff
    d = 1 / (1 + np.exp(-np.clip((x - 0.5) / sigma[:, None] ** 2, -30, 30)))
    diff = (math.log(sigma_max) - math.log(sigma0)) * ((d - x0) ** 2).sum(1) / sigma**2
    return (recon + diff) / (x0.shape[1] * math.log(2)), recon, diff


def test_vlb_matches_numpy_for_fixed_draws():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (4, 30))
    eps_recon = rng.standard_normal((4, 30))
    eps_diff = rng.standard_normal((4, 30))
    log_sigma = np.log([0.1, 0.5, 3.0, 70.0])
    terms = jax.jit(metrics.vlb_terms_from_draws, static_argnums=0)(
        matched_filter_denoiser, None, jnp.asarray(bits), jnp.asarray(eps_recon, jnp.float32),
        jnp.asarray(log_sigma, jnp.float32), jnp.asarray(eps_diff, jnp.float32))
    want_bpb, want_recon, want_diff = numpy_vlb(bits, eps_recon, log_sigma, eps_diff)
    np.testing.assert_allclose(np.asarray(terms.recon_nats), want_recon, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(terms.diff_nats), want_diff, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(terms.bits_per_bit), want_bpb, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(terms.prior_nats), 0.0)


def test_vlb_with_key_is_finite_positive_and_prior_optional():
    bits = jax.random.bernoulli(jax.random.key(0), 0.5, (1024, 24)).astype(jnp.float32)
    vlb = jax.jit(metrics.vlb_bits_per_bit, static_argnums=0, static_argnames="include_prior")
    terms = vlb(matched_filter_denoiser, None, bits, jax.random.key(1))
    assert terms.bits_per_bit.shape == (1024,)
    assert np.all(np.isfinite(terms.bits_per_bit)) and np.all(np.asarray(terms.bits_per_bit) > 0)
    # For independent uniform bits the matched filter is the exact posterior, so the bound is close
    # to the true entropy, 1 bit per bit (per-example std ≈ 1.9 with one σ draw → mean ± 0.06).
    assert 0.8 < float(terms.bits_per_bit.mean()) < 1.2
    with_prior = vlb(matched_filter_denoiser, None, bits, jax.random.key(1), include_prior=True)
    np.testing.assert_allclose(np.asarray(with_prior.prior_nats), 0.5 * np.asarray(bits).sum(1) / 80.0**2, rtol=1e-6)


def test_vlb_runs_on_the_denoiser_contract():
    """With the real ``denoise`` of a freshly initialised SDT (residual exactly 0 at init, spec §2)
    the bound equals the matched-filter-only bound for the same key."""
    from bitgen.config import ModelConfig
    from bitgen.diffusion import denoiser

    cfg = ModelConfig(patch_size=4, seq_tokens=4, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=24,
                      content_dim=8, head_hidden=8, dropout=0.0)
    params = denoiser.init_params(jax.random.key(0), cfg)
    bits = jax.random.bernoulli(jax.random.key(1), 0.5, (3, cfg.seq_bits)).astype(jnp.float32)
    vlb = jax.jit(metrics.vlb_bits_per_bit, static_argnums=0)
    sdt_terms = vlb(functools.partial(denoiser.denoise, cfg=cfg), params, bits, jax.random.key(2))
    mf_terms = vlb(matched_filter_denoiser, None, bits, jax.random.key(2))
    np.testing.assert_allclose(np.asarray(sdt_terms.bits_per_bit), np.asarray(mf_terms.bits_per_bit), rtol=1e-5)
