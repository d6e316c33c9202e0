"""Head comparison: the SDT's per-bit head + binary loss against a token-softmax head +
cross-entropy on the same trunk output (compiled memory and time of loss + gradients)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bitgen.bench.flops import head_flops
from bitgen.bench.programs import random_bits
from bitgen.bench.timing import Program, compiled_memory, time_interleaved
from bitgen.config import ModelConfig

DEFAULT_HEADS = ((128, 30522), (1024, 65536), (4096, 128000))
DEFAULT_HEAD_CHUNK_TOKENS = 128  # bit head chunk (tokens) in the head comparison; 0 = unchunked


class BitHead(nn.Module):
    """The SDT's output path after its trunk (``bitgen.nn.sdt.bit_output``) as a module of its own:
    trunk tokens, content channels and σ embedding -> f_θ [B, S] float32, with the SDT's parameter
    names (``unpatch_proj_content``, ``head``)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, content: jax.Array, t_emb: jax.Array) -> jax.Array:
        from bitgen.nn.sdt import bit_output

        return bit_output(self, self.cfg, tokens, content, t_emb, train=False)


def bits_per_token(vocab: int) -> int:
    """P = ceil(log2 V): the bit-code width of a V-token vocabulary."""
    return max(1, math.ceil(math.log2(vocab)))


def head_chunk(chunk_tokens: int, seq_tokens: int) -> int:
    """The bit head's chunk at T = ``seq_tokens``: the largest divisor of T that is ≤ the request
    (gcd, so powers of two stay powers of two); 0 (off) stays 0."""
    return math.gcd(chunk_tokens, seq_tokens) if chunk_tokens else 0


def head_programs(trunk_cfg: ModelConfig, seq_tokens: int, vocab: int, batch: int, *,
                  chunk_tokens: int = DEFAULT_HEAD_CHUNK_TOKENS):
    """``(cfg, {"bit": (loss_fn, args), ["bit_unchunked": ...,] "token": (loss_fn, args)})``.

    All paths read the same trunk output. Each ``loss_fn(head_params, trunk_out, ...)`` returns a
    scalar loss; trunk_out is [B, T, E]. The bit path (un-patch + SDT head + matched filter +
    binary loss, P = ceil(log2 V)) also takes the per-bit content features [B, S, 2C] the SDT
    computes before its trunk, the noisy bits, σ and the target bits; its head runs in
    rematerialised chunks of ``head_chunk(chunk_tokens, T)`` tokens (``cfg.head_chunk_tokens``),
    and when that is on ``bit_unchunked`` is the same path without chunking. The token path
    (Dense E->V + softmax cross-entropy) takes token labels.
    """
    from bitgen.diffusion.denoiser import combine_logits
    from bitgen.diffusion.loss import loss_from_logits

    p = bits_per_token(vocab)
    cfg = dataclasses.replace(trunk_cfg, patch_size=p, seq_tokens=seq_tokens,
                              head_chunk_tokens=head_chunk(chunk_tokens, seq_tokens))
    e, s, dtype = cfg.embed_dim, cfg.seq_bits, jnp.dtype(cfg.compute_dtype)
    keys = jax.random.split(jax.random.key(3), 6)
    tokens = jax.random.normal(keys[0], (batch, seq_tokens, e), dtype)
    t_emb = jax.random.normal(keys[1], (batch, e), dtype)
    content = jax.random.normal(keys[2], (batch, s, 2 * cfg.content_dim), dtype)
    bits = random_bits(keys[3], batch, s)
    sigma = jnp.full((batch,), 0.5, jnp.float32)
    x_t = bits.astype(jnp.float32) + sigma[:, None] * jax.random.normal(keys[4], (batch, s))
    labels = jax.random.randint(keys[5], (batch, seq_tokens), 0, vocab)

    bit_params = nn.unbox(jax.jit(BitHead(cfg).init)(jax.random.key(4), tokens, content,
                                                     t_emb)["params"])

    def bit_loss_fn(bit_cfg: ModelConfig) -> Callable:
        def bit_loss(params, tokens, content, t_emb, x_t, sigma, bits):
            f_theta = BitHead(bit_cfg).apply({"params": params}, tokens, content, t_emb)
            logits = combine_logits(f_theta, x_t, sigma, cfg=bit_cfg)
            return loss_from_logits(logits, bits, sigma, loss_type="binary_sm", weighting="edm",
                                    sigma_data=0.5)[0]
        return bit_loss

    token_head = nn.Dense(vocab, dtype=dtype, param_dtype=jnp.float32)
    token_params = jax.jit(token_head.init)(jax.random.key(5), tokens)["params"]

    def token_loss(params, tokens, labels):
        logits = token_head.apply({"params": params}, tokens).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    bit_args = (bit_params, tokens, content, t_emb, x_t, sigma, bits)
    programs = {"bit": (bit_loss_fn(cfg), bit_args)}
    if cfg.head_chunk_tokens:
        unchunked = dataclasses.replace(cfg, head_chunk_tokens=0)
        programs["bit_unchunked"] = (bit_loss_fn(unchunked), bit_args)
    programs["token"] = (token_loss, (token_params, tokens, labels))
    return cfg, programs


def head_train_fn(loss_fn: Callable) -> Callable:
    """Jitted loss and gradients w.r.t. the head parameters and the trunk output (what a training
    step needs from a head)."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))



def bench_heads(trunk_cfg: ModelConfig, shapes: Sequence[tuple[int, int]], batch: int, *,
                repeats: int, peak_flops: float | None, time_budget_s: float,
                chunk_tokens: int = DEFAULT_HEAD_CHUNK_TOKENS) -> list[dict]:
    """Per (T, V): compiled memory of the forward loss (``forward_memory``) and of loss + gradients
    (``memory``), always; time of loss + gradients when its estimate fits ``time_budget_s``.

    ``memory_ratio`` judges the bit path as configured (chunked head when ``chunk_tokens`` > 0);
    ``unchunked_memory_ratio`` is the same path with the whole-sequence head, for comparison.
    """
    rows = []
    for seq_tokens, vocab in shapes:
        cfg, programs = head_programs(trunk_cfg, seq_tokens, vocab, batch, chunk_tokens=chunk_tokens)
        flops = head_flops(cfg, vocab, batch)
        row: dict[str, Any] = {"seq_tokens": seq_tokens, "vocab": vocab,
                               "bits_per_token": cfg.patch_size, "batch": batch,
                               "compute_dtype": cfg.compute_dtype,
                               "head_chunk_tokens": cfg.head_chunk_tokens}
        for label, (loss_fn, args) in programs.items():
            train_fn = head_train_fn(loss_fn)
            entry: dict[str, Any] = {"memory": compiled_memory(train_fn, args),
                                     "forward_memory": compiled_memory(jax.jit(loss_fn), args),
                                     "flops": flops[label]}
            estimate = None if peak_flops is None else flops[label] / peak_flops
            if estimate is not None and estimate * (repeats + 1) > time_budget_s:
                entry["time"] = f"skipped: ~{estimate:.1f}s per call exceeds --head-time-budget"
            else:
                entry["time"] = time_interleaved({label: Program(train_fn, args)},
                                                 rounds=repeats)[label].to_dict()
            row[label] = entry
        row["memory_ratio"] = row["bit"]["memory"]["peak_bytes"] / row["token"]["memory"]["peak_bytes"]
        row["forward_memory_ratio"] = (row["bit"]["forward_memory"]["peak_bytes"]
                                       / row["token"]["forward_memory"]["peak_bytes"])
        unchunked = row.get("bit_unchunked", row["bit"])
        row["unchunked_memory_ratio"] = (unchunked["memory"]["peak_bytes"]
                                         / row["token"]["memory"]["peak_bytes"])
        rows.append(row)
    return rows

