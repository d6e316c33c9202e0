"""The BitLM sampler (spec §A.6): one compiled program per setting.

1. Prefill: the start block and the first ``prefill_blocks`` target blocks (given in every row)
   enter the backbone's KV cache in one call; the states of the last block condition the next.
2. A ``lax.while_loop`` over target blocks carries the cache. Per block: the head integrates the
   probability-flow ODE of the linear interpolant from t = 0 (noise ``fold_in(key, b)``) with
   ``steps`` Euler steps on the uniform grid 0 → t_end, then takes the clean prediction at t_end
   (BitDance's final jump: steps + 1 head calls, twice that with guidance); given tokens
   (prompts) are clamped to their codes after every head call; the prediction is decoded to ids
   (invalid-code policy) and appended to the cache as the next input block.
3. Early stop: a row is finished once it generated ``stop_id``; the loop ends when every row is.

Classifier-free guidance: ``x̂ = x̂_u + w (x̂_c − x̂_u)`` on the same z (≡ guidance on the
velocity), the unconditional branch being the head with its learned null condition.

Output: int32 [B, 2, T]: ids, and a status per position: 0 generated or given, 1 generated from
a sign code that names no id (mapped by the policy), 2 not generated (after the stop).

Invalid-code policies (spec §A.2), with code_table [V, P] the ±1 codes of the valid ids:
  "max_correlation": ``argmax_y ⟨φ(y), x̂⟩`` (the prediction itself);
  "sign_nearest":    ``argmax_y ⟨φ(y), sign(x̂)⟩``: the sign code when it is valid, else the
                     valid code nearest in Hamming distance.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bitgen.nn.bitlm import BitLMConfig, backbone_extend, head_predict, init_backbone_cache, slot_logits
from bitgen.sampling.block_rows import NOT_GENERATED, block_status

POLICIES = ("max_correlation", "sign_nearest")


@dataclass(frozen=True)
class BitLMSampling:
    """steps K (Euler steps per block), guidance w (1 = off), t_end of the ODE grid, the
    invalid-code policy, stop_id (−1: never stop early), temperature (softmax control only)."""

    steps: int = 15
    guidance: float = 9.0
    t_end: float = 0.95
    policy: str = "max_correlation"
    stop_id: int = -1
    temperature: float = 1.0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not one of {POLICIES}")


def decode_codes(x_hat: jax.Array, code_table: jax.Array, policy: str) -> tuple[jax.Array, jax.Array]:
    """x̂ [..., P] -> (ids [...], invalid [...]: sign(x̂) names no id). code_table [V, P] ±1."""
    signs = jnp.where(x_hat > 0, 1.0, -1.0)
    sign_match = signs @ code_table.T  # [..., V]; == P exactly for the id whose code is sign(x̂)
    invalid = jnp.max(sign_match, axis=-1) < code_table.shape[-1]
    scores = x_hat @ code_table.T if policy == "max_correlation" else sign_match
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), invalid


def _guided(params, z, t, states, *, cfg: BitLMConfig, guidance: float):
    n = z.shape[0]
    if guidance == 1.0:
        return head_predict(params, z, t, states, jnp.zeros((n,), bool), cfg=cfg)
    both = head_predict(params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                        jnp.concatenate([states, states]),
                        jnp.arange(2 * n) >= n, cfg=cfg)
    cond, uncond = both[:n], both[n:]
    return uncond + guidance * (cond - uncond)


def _diffusion_block(params, key, states, known, known_codes, code_table, *, cfg, opts):
    """One block: ODE from noise, clamped to the known codes, then decoded. -> (ids, invalid)."""
    batch, m, p = known_codes.shape
    grid = jnp.linspace(0.0, opts.t_end, opts.steps + 1)
    ones = jnp.ones((batch,), jnp.float32)

    def predict(z, t):
        x_hat = _guided(params, z, t * ones, states, cfg=cfg, guidance=opts.guidance)
        return jnp.where(known[..., None], known_codes, x_hat)

    def euler(z, k):
        t, t_next = grid[k], grid[k + 1]
        return z + (t_next - t) * (predict(z, t) - z) / (1.0 - t), None

    z, _ = jax.lax.scan(euler, jax.random.normal(key, (batch, m, p)), jnp.arange(opts.steps))
    return decode_codes(predict(z, grid[-1]), code_table, opts.policy)


def _softmax_block(params, key, states, *, cfg, opts):
    logits = slot_logits(params, states, cfg=cfg) / opts.temperature
    ids = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return ids, jnp.zeros(ids.shape, bool)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "prefill_blocks"))
def bitlm_sample(params: dict, key: jax.Array, prompt: jax.Array, known: jax.Array,
                 code_table: jax.Array, *, cfg: BitLMConfig, opts: BitLMSampling,
                 prefill_blocks: int) -> jax.Array:
    """Rows [B, 2, T] (ids, status) continuing ``prompt`` ids [B, T] where ``known`` [B, T].

    ``prefill_blocks``: leading blocks of m tokens known in every row (they go into the cache in
    one call). Known tokens after them (ragged prompts) are clamped inside their block.
    code_table [V, P] float32: the ±1 codes of ids 0..V−1 (diffusion head only).
    """
    m, n_blocks = cfg.block_tokens, cfg.n_blocks
    batch, length = prompt.shape
    if length != cfg.trunk.seq_len or not 0 <= prefill_blocks < n_blocks:
        raise ValueError(f"prompt rows of {length} tokens (need {cfg.trunk.seq_len}) or "
                         f"prefill_blocks={prefill_blocks} outside [0, {n_blocks})")
    prompt = prompt.astype(jnp.int32)
    ids = jnp.where(known, prompt, 0)
    status = jnp.where(jnp.arange(length) < prefill_blocks * m, 0, NOT_GENERATED) * jnp.ones_like(ids)
    states, cache = backbone_extend(params, init_backbone_cache(cfg, batch), ids[:, :prefill_blocks * m],
                                    cfg=cfg, with_start=True)

    def block(carry):
        b, ids, status, done, states, cache = carry
        start = b * m
        given = jax.lax.dynamic_slice_in_dim(known, start, m, axis=1)
        given_ids = jax.lax.dynamic_slice_in_dim(prompt, start, m, axis=1)
        key_b = jax.random.fold_in(key, b)
        if cfg.head_kind == "softmax":
            drawn, invalid = _softmax_block(params, key_b, states, cfg=cfg, opts=opts)
        else:
            drawn, invalid = _diffusion_block(params, key_b, states, given, code_table[given_ids],
                                              code_table, cfg=cfg, opts=opts)
        block_ids = jnp.where(given, given_ids, drawn)
        status_b, stopped = block_status(block_ids, given, invalid, done, opts.stop_id)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, block_ids, start, axis=1)
        status = jax.lax.dynamic_update_slice_in_dim(status, status_b, start, axis=1)
        done = done | stopped
        states, cache = backbone_extend(params, cache, block_ids, cfg=cfg, with_start=False)
        return b + 1, ids, status, done, states, cache

    def running(carry):
        b, *_, done, _, _ = carry
        return (b < n_blocks) & ~jnp.all(done)

    init = (jnp.int32(prefill_blocks), ids, status, jnp.zeros((batch,), bool), states, cache)
    _, ids, status, *_ = jax.lax.while_loop(running, block, init)
    return jnp.stack([ids, status], axis=1)
