"""Causal transformer LM over token ids: the autoregressive baseline and an in-house GenPPL evaluator.

Built from the SDT's blocks: affine-free pre-LayerNorm, ``bitgen.nn.attention.Attention`` (causal,
rotate-half RoPE, optional KV cache), SwiGLU MLP; then a final norm and an untied LM head. The same
modules serve full-sequence training/scoring and cached token-by-token decoding.

Public API (params are plain pytrees; logical axes ``vocab``, ``embed``, ``heads``, ``mlp``):
  ARConfig
  init_ar_params(key, cfg) -> params;  param_logical_axes(cfg) -> PartitionSpec tree
  ar_logits(params, ids [B,T], *, cfg, key=None, train=False) -> logits [B,T,V] float32
  ar_loss(params, ids [B,T], key, *, cfg, train, target_mask=None) -> (loss, aux)   # next-token CE
  sequence_nll(params, ids [B,T], mask [B,T], *, cfg) -> (nll_sum [B], n_scored [B])
  init_kv_cache(cfg, batch, max_len) -> cache   # n_blocks × attention.KVCache
  ar_decode_step(params, cache, ids [B,C], *, cfg) -> (logits [B,C,V], cache)   # appends at cache length
  ar_sample(params, key, prompt [B,P], *, cfg, length, prompt_lengths=None, temperature=1.0,
            top_p=1.0) -> ids [B,length]
  sample_next_token(logits [B,V], key, *, temperature, top_p) -> ids [B]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bitgen.nn.nll import windowed_sequence_nll
from bitgen.nn import attention
from bitgen.nn.layers import Dropout, SwiGLU, constrain, dense, layer_norm, normal_002

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class ARConfig:
    """Causal transformer hyper-parameters. Defaults: a GPT-2-small-sized model on LM1B BERT ids."""

    vocab_size: int = 30522
    seq_len: int = 128  # training length T; also the scoring window
    embed_dim: int = 768
    n_heads: int = 12
    n_blocks: int = 12
    dim_ff: int = 3072  # SwiGLU hidden = int(2*dim_ff/3), as in the SDT
    dropout: float = 0.1
    compute_dtype: str = "float32"  # float32 | bfloat16 activations; params stay float32
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"ARConfig.compute_dtype={self.compute_dtype!r} is not one of {tuple(_DTYPES)}")
        if self.embed_dim % self.n_heads or (self.embed_dim // self.n_heads) % 2:
            raise ValueError(f"ARConfig.embed_dim={self.embed_dim} must split into n_heads={self.n_heads} "
                             "heads of even size (RoPE rotates pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ARConfig.dropout={self.dropout} must be in [0, 1)")
        if self.seq_len < 2:
            raise ValueError(f"ARConfig.seq_len={self.seq_len} must be >= 2 to predict a next token")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.n_heads

    @property
    def dtype(self):
        return _DTYPES[self.compute_dtype]


KVCache = tuple[attention.KVCache, ...]  # one layer cache per block


class DecoderBlock(nn.Module):
    """Pre-LN residual block: attention (causal, or block-causal with ``block_size`` = m > 1) then
    SwiGLU. x [B, C, E] (float32 residual) with an optional layer cache -> (x, cache); ``mask``: an
    extra attention mask (e.g. ``attention.segment_mask`` for packed rows)."""

    cfg: ARConfig
    block_size: int = 1

    @nn.compact
    def __call__(self, x_BxCxE, cache: attention.KVCache | None, train: bool, mask=None):
        cfg = self.cfg
        drop = Dropout(cfg.dropout, deterministic=not train)
        h, cache = attention.Attention(cfg.n_heads, block_size=self.block_size, rope_base=cfg.rope_base,
                                       dtype=cfg.dtype, name="attn")(
            layer_norm(x_BxCxE).astype(cfg.dtype), cache=cache, mask=mask)
        x_BxCxE = x_BxCxE + drop(h).astype(x_BxCxE.dtype)
        h = SwiGLU(int(2 * cfg.dim_ff / 3), dropout=cfg.dropout, dtype=cfg.dtype, name="mlp")(
            layer_norm(x_BxCxE).astype(cfg.dtype), train=train)
        x_BxCxE = x_BxCxE + drop(h).astype(x_BxCxE.dtype)
        return constrain(x_BxCxE, ("batch", "seq", "embed")), cache


class ARTransformer(nn.Module):
    """ids [B, C] at positions p0..p0+C-1 -> (logits [B, C, V] float32, updated cache or None).

    p0 = 0 without a cache, else the cache's length (the chunk is appended to it).
    """

    cfg: ARConfig

    @nn.compact
    def __call__(self, ids_BxC, *, cache: KVCache | None = None, train: bool = False):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim,
                         embedding_init=nn.with_logical_partitioning(normal_002, ("vocab", "embed")),
                         name="embed")
        x_BxCxE = embed(ids_BxC)  # residual stream in float32
        new_cache = []
        for i in range(cfg.n_blocks):
            x_BxCxE, layer_cache = DecoderBlock(cfg, name=f"block_{i}")(
                x_BxCxE, None if cache is None else cache[i], train)
            new_cache.append(layer_cache)
        h = layer_norm(x_BxCxE).astype(cfg.dtype)
        logits = dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", dtype=cfg.dtype, use_bias=False)(h)
        return logits.astype(jnp.float32), None if cache is None else tuple(new_cache)


def init_ar_params(key: jax.Array, cfg: ARConfig) -> dict:
    """Random parameters (N(0, 0.02) weights, zero biases), logical-axis boxes removed."""
    ids = jnp.zeros((1, min(8, cfg.seq_len)), jnp.int32)
    # One compiled init instead of op-by-op dispatch of every initialiser.
    return jax.jit(lambda k: nn.unbox(ARTransformer(cfg).init(k, ids))["params"])(key)


def param_logical_axes(cfg: ARConfig) -> dict:
    """Pytree matching ``init_ar_params`` whose leaves are PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(ARTransformer(cfg).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    return nn.get_partition_spec(boxed)["params"]


def ar_logits(params: dict, ids: jax.Array, *, cfg: ARConfig, key: jax.Array | None = None,
              train: bool = False) -> jax.Array:
    """ids [B, T] -> logits [B, T, V] float32; position t predicts token t+1. ``key`` drives dropout."""
    if train and cfg.dropout > 0 and key is None:
        raise ValueError("ar_logits(train=True) with dropout > 0 needs a PRNG key")
    rngs = {"dropout": key} if train and key is not None else None
    logits, _ = ARTransformer(cfg).apply({"params": params}, ids, train=train, rngs=rngs)
    return logits


def ar_loss(params: dict, ids: jax.Array, key: jax.Array | None, *, cfg: ARConfig,
            train: bool, target_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy (nats), mean over the B·(T−1) predicted tokens of ids [B, T].

    target_mask [B, T] bool (None = every token): only tokens t >= 1 with ``target_mask[:, t]``
    are scored (their prediction comes from position t−1), and the mean is over those tokens
    (a batch without any is 0). Conditional training: False on the given prompt tokens.
    aux: ``{"nll": loss, "accuracy": top-1 accuracy of the scored predictions}``.
    """
    logits = ar_logits(params, ids[:, :-1], cfg=cfg, key=key, train=train)
    targets = ids[:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    if target_mask is None:
        loss, accuracy = nll.mean(), correct.mean()
    else:
        scored = target_mask[:, 1:]
        count = jnp.maximum(jnp.sum(scored), 1)
        loss = jnp.sum(jnp.where(scored, nll, 0.0)) / count
        accuracy = jnp.sum(scored & correct) / count
    return loss, {"nll": loss, "accuracy": accuracy}


def sequence_nll(params: dict, ids: jax.Array, mask: jax.Array, *,
                 cfg: ARConfig) -> tuple[jax.Array, jax.Array]:
    """Per-row NLL sum (nats) and scored-token count over windows of seq_len (spec §6.1 rule)."""
    window = min(cfg.seq_len, ids.shape[1])
    return windowed_sequence_nll(lambda w: ar_logits(params, w, cfg=cfg), ids, mask, window=window)


# --------------------------------------------------------------------------------------------------
# KV-cached decoding


def init_kv_cache(cfg: ARConfig, batch: int, max_len: int) -> KVCache:
    """Empty cache for ``max_len`` positions: n_blocks × ``attention.KVCache`` [B, max_len, heads, head_dim]."""
    return tuple(attention.init_cache(batch, max_len, cfg.n_heads, cfg.head_dim, cfg.dtype)
                 for _ in range(cfg.n_blocks))


def ar_decode_step(params: dict, cache: KVCache, ids: jax.Array, *, cfg: ARConfig) -> tuple[jax.Array, KVCache]:
    """Append ids [B, C] at the cache's next positions p0..p0+C−1; returns (logits [B,C,V], cache).

    The first call with a prompt chunk is the prefill; later calls append one token (or any chunk).
    """
    logits, cache = ARTransformer(cfg).apply({"params": params}, ids, cache=cache)
    return logits, cache


def sample_next_token(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """Draw ids [B] from logits [B, V] with temperature and nucleus (top-p) truncation.

    temperature <= 0 is greedy (argmax). top-p keeps the smallest set of most likely tokens whose
    mass reaches top_p (always at least the most likely one), then renormalises.
    """
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1 since mass_before[0] = 0
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "length", "temperature", "top_p"))
def ar_sample(params: dict, key: jax.Array, prompt: jax.Array, *, cfg: ARConfig, length: int,
              prompt_lengths: jax.Array | None = None, temperature: float = 1.0,
              top_p: float = 1.0) -> jax.Array:
    """Sample ids [B, length] continuing ``prompt`` [B, P] (e.g. a BOS column, P = 1).

    One compiled ``lax.scan`` over positions with a KV cache: at step t the token at t is fed and
    the token at t+1 is either taken from the prompt (t+1 < prompt_lengths[b]) or drawn with
    ``fold_in(key, t)``. prompt_lengths [B] in [1, P] (default P) lets rows have ragged prompts.
    ``length`` may exceed cfg.seq_len only if RoPE extrapolation is acceptable to you.
    """
    batch, prompt_len = prompt.shape
    if not 1 <= prompt_len <= length:
        raise ValueError(f"prompt length {prompt_len} must be in [1, length={length}]; "
                         "pass at least a BOS column")
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), prompt_len, jnp.int32)
    ids = jnp.zeros((batch, length), jnp.int32).at[:, :prompt_len].set(prompt.astype(jnp.int32))

    def step(carry, t):
        ids, cache = carry
        token = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)
        logits, cache = ar_decode_step(params, cache, token, cfg=cfg)
        drawn = sample_next_token(logits[:, 0], jax.random.fold_in(key, t),
                                  temperature=temperature, top_p=top_p)
        given = jax.lax.dynamic_index_in_dim(ids, t + 1, axis=1, keepdims=False)
        chosen = jnp.where(t + 1 < prompt_lengths, given, drawn)
        ids = jax.lax.dynamic_update_index_in_dim(ids, chosen, t + 1, axis=1)
        return (ids, cache), None

    (ids, _), _ = jax.lax.scan(step, (ids, init_kv_cache(cfg, batch, length)), jnp.arange(length - 1))
    return ids
