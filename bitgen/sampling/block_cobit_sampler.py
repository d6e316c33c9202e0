"""The Block CoBit sampler: CoBit's sampler run block by block over a KV cache, one compiled program.

1. Prefill: the first ``prefill_blocks`` blocks (given in every row) enter the block SDT's KV
   cache as clean context in one call (``bitgen.nn.block_sdt.append_clean``).
2. A ``lax.while_loop`` over the remaining blocks carries the cache. Per block b: ``integrate``
   (``bitgen.sampling.samplers``: the run's σ-grid, step object, churn and carried
   self-conditioning, exactly as CoBit samples a row) runs on the block's m·P bits from
   x = ½ + σ_0·ε (ε from ``fold_in(key, b)``), its denoiser being the block SDT against the
   cache. Given tokens inside the block (ragged prompts) are clamped through ``Cond``. The bits
   are decoded to ids by the codec's rule (``modulo`` / ``nearest``, position by position), the
   decoded ids' codes are appended to the cache as the clean block in one call.
3. Early stop: a row is finished once it generated ``stop_id``; the loop ends when every row is.

Output: int32 [B, 2, T]: ids and a status per position, 0 generated or given, 1 generated from a
code that names no id (mapped by the codec's rule), 2 not generated (after the stop).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bitgen.codecs import BitCodec
from bitgen.config import ModelConfig
from bitgen.diffusion.cond import Cond
from bitgen.diffusion.denoiser import combine_logits
from bitgen.nn.block_sdt import append_clean, block_residual, init_block_cache
from bitgen.sampling.samplers import integrate
from bitgen.sampling.settings import SamplerSettings
from bitgen.sampling.steps import initial_state
from bitgen.sampling.block_rows import NOT_GENERATED, block_status

POSITIONWISE_POLICIES = ("modulo", "nearest")  # codec rules that decode each token on its own


@dataclass(frozen=True)
class BlockCoBitSampling:
    """settings: the CoBit sampler of one block (``seq_bits`` = m·P); block_tokens m;
    clean_sigma: the σ level of clean context tokens; stop_id (−1: never stop early)."""

    settings: SamplerSettings
    block_tokens: int
    clean_sigma: float
    stop_id: int = -1


def block_denoiser(cache, *, cfg: ModelConfig, block_tokens: int):
    """The CoBit denoiser contract over one block after the clean blocks in ``cache``:
    ``(params, x [B, m·P], sigma [B], x0_hat [B, m·P], cond=None) -> logits [B, m·P]`` (residual
    + matched filter). Clamped bits reach it through x (``cond`` carries nothing else here)."""

    def denoise(params, x, sigma, x0_hat, cond: Cond | None = None):
        f_theta = block_residual(params, cache, x, sigma, x0_hat, cfg=cfg, block_tokens=block_tokens)
        return combine_logits(f_theta, x, sigma, cfg=cfg)

    return denoise


def decode_block(bits: jax.Array, codec: BitCodec) -> tuple[jax.Array, jax.Array]:
    """bits [B, C·P] -> (ids [B, C] by the codec's position-wise rule, invalid [B, C]: the code
    names no id)."""
    if codec.policy not in POSITIONWISE_POLICIES:
        raise ValueError(f"codec policy {codec.policy!r} does not decode token by token; "
                         f"use one of {POSITIONWISE_POLICIES}")
    index = codec.codes_to_index(codec.bits_to_codes(bits))
    return codec.decode(bits).ids.astype(jnp.int32), index >= jnp.uint32(codec.vocab_size)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "codec", "prefill_blocks"))
def block_cobit_sample(params, key: jax.Array, prompt_bits: jax.Array, known: jax.Array,
                       grid: jax.Array, *, cfg: ModelConfig, opts: BlockCoBitSampling,
                       codec: BitCodec, prefill_blocks: int) -> jax.Array:
    """Rows [B, 2, T] (ids, status) continuing the given tokens.

    prompt_bits [B, S] uint8: the codes of the given tokens (anything elsewhere); known [B, T]
    bool: which tokens are given; grid [N]: the descending σ-grid of ``opts.settings``.
    ``prefill_blocks``: leading blocks known in every row (they go into the cache in one call).
    """
    m, p = opts.block_tokens, cfg.patch_size
    batch, seq_tokens = prompt_bits.shape[0], known.shape[-1]
    known = jnp.broadcast_to(known, (batch, seq_tokens))
    n_blocks, block_bits = seq_tokens // m, m * p
    if seq_tokens != cfg.seq_tokens or seq_tokens % m or not 0 <= prefill_blocks < n_blocks:
        raise ValueError(f"rows of {seq_tokens} tokens (need {cfg.seq_tokens}, a multiple of {m}) "
                         f"or prefill_blocks={prefill_blocks} outside [0, {n_blocks})")
    prompt_bits = prompt_bits.astype(jnp.uint8)
    ids = jnp.zeros((batch, seq_tokens), jnp.int32)
    status = jnp.full((batch, seq_tokens), NOT_GENERATED, jnp.int32)
    cache = init_block_cache(cfg, batch)
    if prefill_blocks:
        given = prompt_bits[:, :prefill_blocks * block_bits]
        ids = ids.at[:, :prefill_blocks * m].set(decode_block(given, codec)[0])
        status = status.at[:, :prefill_blocks * m].set(0)
        cache = append_clean(params, cache, given, cfg=cfg, block_tokens=m, clean_sigma=opts.clean_sigma)

    def block(carry):
        b, ids, status, done, cache = carry
        given = jax.lax.dynamic_slice_in_dim(known, b * m, m, axis=1)  # [B, m]
        cond = Cond.clamped(jnp.repeat(given, p, axis=1),
                            jax.lax.dynamic_slice_in_dim(prompt_bits, b * block_bits, block_bits, axis=1))
        k_init, k_churn = jax.random.split(jax.random.fold_in(key, b))
        x_init = initial_state(jax.random.normal(k_init, (batch, block_bits)), grid[0])
        bits = integrate(params, x_init, grid, opts.settings,
                         block_denoiser(cache, cfg=cfg, block_tokens=m), cond=cond,
                         key_churn=k_churn).bits
        block_ids, invalid = decode_block(bits, codec)
        status_b, stopped = block_status(block_ids, given, invalid, done, opts.stop_id)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, block_ids, b * m, axis=1)
        status = jax.lax.dynamic_update_slice_in_dim(status, status_b, b * m, axis=1)
        clean = codec.ids_to_bits(block_ids.astype(jnp.uint32))
        cache = append_clean(params, cache, clean, cfg=cfg, block_tokens=m, clean_sigma=opts.clean_sigma)
        return b + 1, ids, status, done | stopped, cache

    def running(carry):
        b, _, _, done, _ = carry
        return (b < n_blocks) & ~jnp.all(done)

    init = (jnp.int32(prefill_blocks), ids, status, jnp.zeros((batch,), bool), cache)
    _, ids, status, _, _ = jax.lax.while_loop(running, block, init)
    return jnp.stack([ids, status], axis=1)
