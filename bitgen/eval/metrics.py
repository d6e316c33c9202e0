"""Evaluation metrics of cobit-spec §6: GenPPL, unigram entropy and the VLB bits-per-bit bound.

* ``windowed_sequence_nll`` — the scoring rule every evaluator shares (§6.1): non-overlapping windows
  of the model's context length, the first token of each window unscored.
* ``gen_ppl`` — token-weighted corpus perplexity of texts under an evaluator ``score`` function;
  re-tokenisation (no BOS) and length-bucketed padding happen here so the scorer compiles once per
  bucket; texts are scored one at a time, so a text's score does not depend on the others.
* ``unigram_entropy`` / ``mean_unigram_entropy`` — per-sample token-frequency entropy in nats (§6.2).
* ``vlb_bits_per_bit`` — the monitoring bound of §6.4 for any denoiser callable.

Host-side metrics (entropy, GenPPL aggregation) use numpy on ragged Python lists; everything that
touches a model is pure and jit-able.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.nn.nll import windowed_sequence_nll  # noqa: F401 (re-exported: the shared scoring rule)

# (ids [B,L] int32, mask [B,L] bool) -> (nll_sum [B] nats, n_scored [B])
Scorer = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# (params, x [B,S], sigma [B], x0_hat [B,S]) -> logits [B,S]
DenoiseFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------------------------------
# GenPPL


class GenPPLResult(NamedTuple):
    ppl: float  # exp(nll_sum / n_tokens)
    nll_sum: float  # nats over all samples
    n_tokens: int  # scored tokens over all samples
    sample_nll: np.ndarray  # [N] nats per text
    sample_tokens: np.ndarray  # [N] scored tokens per text


def bucket_length(n: int, *, window: int, min_bucket: int = 64) -> int:
    """Padded length for a text of n tokens: a power of two in [min_bucket, window], then whole windows.

    Few distinct lengths means few compilations of the scorer; whole windows beyond the context
    length keep the padding waste under one window.
    """
    if n <= window:
        bucket = max(min_bucket, 1 << max(0, n - 1).bit_length())
        return min(bucket, window)
    return -(-n // window) * window


def gen_ppl(
    texts: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    score: Scorer,
    *,
    window: int,
    min_bucket: int = 64,
) -> GenPPLResult:
    """Token-weighted generative perplexity of ``texts`` under an evaluator (spec §6.1).

    Args:
      texts: decoded samples.
      encode: the evaluator's tokenizer, text -> ids, without BOS/special tokens.
      score: jitted scorer (ids [B,L], mask [B,L]) -> (nll_sum [B], n_scored [B]), e.g.
        ``jax.jit(functools.partial(gpt2.sequence_nll, params, cfg=cfg))``. It is called on one
        text at a time, at the bucketed length of that text (``bucket_length``), so it compiles once
        per bucket and a text's score is a function of the text alone: the same program on the same
        input whatever the other texts, their number or their order (the reference also scores
        texts one at a time). Calls are dispatched without waiting for earlier results.
      window: the evaluator's context length (used only to choose buckets).
    Returns:
      GenPPLResult with exp(Σ NLL / Σ scored tokens) over all texts (not a mean of per-text PPLs);
      the totals are float64 sums in text order.
    """
    if not texts:
        raise ValueError("gen_ppl needs at least one text")
    pending = []
    for text in texts:
        tokens = np.asarray(encode(text), dtype=np.int32)
        ids = np.zeros((1, bucket_length(len(tokens), window=window, min_bucket=min_bucket)), np.int32)
        ids[0, : len(tokens)] = tokens
        pending.append(score(ids, np.arange(ids.shape[1])[None] < len(tokens)))
    scored = jax.device_get(pending)
    sample_nll = np.asarray([nll[0] for nll, _ in scored], np.float64)
    sample_tokens = np.asarray([n[0] for _, n in scored], np.int64)
    total_tokens = int(sample_tokens.sum())
    if total_tokens == 0:
        raise ValueError("no text has two or more tokens after re-tokenisation; GenPPL is undefined")
    total_nll = float(sample_nll.sum())
    return GenPPLResult(math.exp(total_nll / total_tokens), total_nll, total_tokens, sample_nll, sample_tokens)


# --------------------------------------------------------------------------------------------------
# Unigram entropy


def unigram_entropy(tokens: Sequence[int] | np.ndarray) -> float:
    """Entropy in nats, −Σ p ln p, of one sample's empirical token frequencies (spec §6.2)."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size == 0:
        raise ValueError("unigram entropy of an empty sample is undefined; decode empty samples "
                         "to a placeholder token first (spec §5.4)")
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / tokens.size
    return float(-(p * np.log(p)).sum())


def mean_unigram_entropy(samples: Sequence[Sequence[int] | np.ndarray]) -> float:
    """Per-sample unigram entropy (nats) averaged over samples; samples may have different lengths."""
    if len(samples) == 0:
        raise ValueError("mean_unigram_entropy needs at least one sample")
    return float(np.mean([unigram_entropy(s) for s in samples]))


# --------------------------------------------------------------------------------------------------
# VLB bound


class VLBTerms(NamedTuple):
    bits_per_bit: jax.Array  # [B] (recon + diff [+ prior]) / (S ln 2)
    recon_nats: jax.Array  # [B]
    diff_nats: jax.Array  # [B]
    prior_nats: jax.Array  # [B]; zeros unless include_prior


def vlb_terms_from_draws(
    denoise_fn: DenoiseFn,
    params,
    bits: jax.Array,
    eps_recon: jax.Array,
    log_sigma: jax.Array,
    eps_diff: jax.Array,
    *,
    sigma_min_eval: float = 0.08,
    sigma_max: float = 80.0,
    include_prior: bool = False,
) -> VLBTerms:
    """The §6.4 bound for given noise draws (so tests can replay them).

    Args:
      denoise_fn: (params, x [B,S], sigma [B], x0_hat [B,S]) -> logits [B,S]; D = sigmoid(logits).
      bits: [B, S] clean bits in {0, 1}.
      eps_recon, eps_diff: [B, S] standard normal noise for the reconstruction and diffusion terms.
      log_sigma: [B] ln σ in [ln σ_min_eval, ln σ_max] (one Monte-Carlo draw per example).
    """
    if bits.ndim != 2:
        raise ValueError(f"bits must be [B, S]; got shape {bits.shape}")
    x0 = bits.astype(jnp.float32)
    batch, n_bits = x0.shape
    no_self_cond = jnp.zeros_like(x0)  # "no self-conditioning" is the zeros tensor (spec §2)

    sigma0 = jnp.full((batch,), sigma_min_eval, jnp.float32)
    recon_logits = denoise_fn(params, x0 + sigma_min_eval * eps_recon, sigma0, no_self_cond)
    recon_logits = recon_logits.astype(jnp.float32)
    bce = -(x0 * jax.nn.log_sigmoid(recon_logits) + (1.0 - x0) * jax.nn.log_sigmoid(-recon_logits))
    recon = bce.sum(axis=1)

    sigma = jnp.exp(log_sigma.astype(jnp.float32))
    x_sigma = x0 + sigma[:, None] * eps_diff
    denoised = jax.nn.sigmoid(denoise_fn(params, x_sigma, sigma, no_self_cond).astype(jnp.float32))
    # MC estimate of ∫ E‖D−x0‖²/σ² d ln σ with ln σ ~ U: integrand times the interval length.
    log_interval = math.log(sigma_max) - math.log(sigma_min_eval)
    diff = log_interval * ((denoised - x0) ** 2).sum(axis=1) / sigma**2

    prior = 0.5 * (x0**2).sum(axis=1) / sigma_max**2 if include_prior else jnp.zeros_like(recon)
    bpb = (prior + recon + diff) / (n_bits * math.log(2.0))
    return VLBTerms(bpb, recon, diff, prior)


def vlb_bits_per_bit(
    denoise_fn: DenoiseFn,
    params,
    bits: jax.Array,
    key: jax.Array,
    *,
    sigma_min_eval: float = 0.08,
    sigma_max: float = 80.0,
    include_prior: bool = False,
) -> VLBTerms:
    """VLB bound in bits per bit position (spec §6.4); draws its noise from ``key``.

    ``key`` is split into (reconstruction noise, ln σ, diffusion noise). Pure and jit-able with
    ``denoise_fn`` static. Monitoring only: the prior term is excluded by default as in the reference.
    """
    key_recon, key_sigma, key_diff = jax.random.split(key, 3)
    shape = bits.shape
    eps_recon = jax.random.normal(key_recon, shape, jnp.float32)
    log_sigma = jax.random.uniform(
        key_sigma, shape[:1], jnp.float32, math.log(sigma_min_eval), math.log(sigma_max)
    )
    eps_diff = jax.random.normal(key_diff, shape, jnp.float32)
    return vlb_terms_from_draws(
        denoise_fn, params, bits, eps_recon, log_sigma, eps_diff,
        sigma_min_eval=sigma_min_eval, sigma_max=sigma_max, include_prior=include_prior,
    )
