"""BitLM (spec Part A): a block-causal Transformer backbone over token ids and a bitwise diffusion
head (``bitgen.nn.bit_head``) that generates the P-bit codes of the m tokens of the next block.

Next-block shift (spec §A.3 / §B.6). A row of T = n·m target ids x_0..x_{T−1} is read as n blocks
of m. The backbone input is ``[S, x_0 … x_{T−m−1}]`` where S is a learned *start block* of m
vectors; attention is full inside each block of m input positions and causal across blocks. The
states at input block b (the start block for b = 0, else the ids of target block b−1) condition the
head for target block b: block b sees exactly the targets of blocks < b. One backbone call per
block both writes block b−1's ids into the KV cache and conditions block b.

Softmax control (the paper's "BitLM w/ LM head"): the same backbone and shift with a per-slot
softmax over the V ids instead of the diffusion head (``head="softmax"``).

Params: ``{"backbone": ..., "head": ...}``. Shape letters: B rows, T tokens, n blocks, M = m,
P bits per token, E width, V vocabulary.

Public API:
  BitLMConfig
  init_bitlm_params(key, cfg) -> params;  param_logical_axes(cfg) -> PartitionSpec tree
  backbone_states(params, ids [B,T], *, cfg, key=None, train=False, segments=None) -> states [B,T,E]
  input_segments(segments [B,T], m) -> segment ids of the backbone input [B,T]   (packed rows)
  init_backbone_cache(cfg, batch) -> cache            # T + m positions
  backbone_extend(params, cache, ids [B,C], *, cfg, with_start) -> (states [B,m,E] of the last block, cache)
  head_predict(params, z [N,M,P], t [N], states [N,M,E], drop [N], *, cfg) -> x̂ [N,M,P]
  slot_logits(params, states [..,E], *, cfg) -> logits [..,V]   (softmax control)
  bitlm_loss(params, ids [B,T], codes [B,T,P] ±1, key, *, cfg, train) -> (loss, aux)
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bitgen.nn import ar, attention
from bitgen.nn.bit_head import BitHead, BitHeadConfig, flow_x_loss, sample_train_times
from bitgen.nn.layers import dense, layer_norm, normal_002

HEADS = ("diffusion", "softmax")


@dataclass(frozen=True)
class BitLMConfig:
    """trunk: the backbone's sizes (an ``ARConfig``: vocabulary, T, width, depth...); block_tokens
    m; head: the diffusion head; head_kind: "diffusion" | "softmax" (the control).

    Training: t_mean/t_std of the logit-normal time draw, v_floor of the velocity weight,
    batch_mul fresh (t, ε) draws per block, cond_dropout: probability a block's condition is
    replaced by the null condition (trains the unconditional branch for guidance)."""

    trunk: ar.ARConfig
    block_tokens: int
    head: BitHeadConfig
    head_kind: str = "diffusion"
    t_mean: float = -0.8
    t_std: float = 0.8
    v_floor: float = 0.05
    batch_mul: int = 4
    cond_dropout: float = 0.1

    def __post_init__(self):
        if self.trunk.seq_len % self.block_tokens:
            raise ValueError(f"seq_len={self.trunk.seq_len} must be a multiple of block_tokens="
                             f"{self.block_tokens}")
        if self.head_kind not in HEADS:
            raise ValueError(f"head_kind={self.head_kind!r} is not one of {HEADS}")

    @property
    def n_blocks(self) -> int:
        return self.trunk.seq_len // self.block_tokens


class Backbone(nn.Module):
    """ids [B, C] -> (states [B, C(+m), E] float32, cache). ``with_start`` puts the learned start
    block before the ids (the first chunk of a row); positions continue the cache's. ``mask``: an
    extra attention mask [B, 1, C(+m), C(+m)] ANDed with the block-causal one (packed rows)."""

    cfg: BitLMConfig

    @nn.compact
    def __call__(self, ids, *, with_start: bool, cache=None, train: bool = False, mask=None):
        trunk, m = self.cfg.trunk, self.cfg.block_tokens
        x = nn.Embed(trunk.vocab_size, trunk.embed_dim, name="embed",
                     embedding_init=nn.with_logical_partitioning(normal_002, ("vocab", "embed")))(ids)
        if with_start:
            start = self.param("start_block", nn.with_logical_partitioning(normal_002, (None, "embed")),
                               (m, trunk.embed_dim))
            x = jnp.concatenate([jnp.broadcast_to(start, (x.shape[0], m, trunk.embed_dim)), x], axis=1)
        new_cache = []
        for i in range(trunk.n_blocks):
            x, layer_cache = ar.DecoderBlock(trunk, block_size=m, name=f"block_{i}")(
                x, None if cache is None else cache[i], train, mask)
            new_cache.append(layer_cache)
        return layer_norm(x), None if cache is None else tuple(new_cache)


class SlotSoftmax(nn.Module):
    """The control's output layer: states [..., E] -> logits [..., V] float32."""

    vocab_size: int

    @nn.compact
    def __call__(self, states):
        return dense(self.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False)(states)


def _head_module(cfg: BitLMConfig) -> nn.Module:
    return BitHead(cfg.head) if cfg.head_kind == "diffusion" else SlotSoftmax(cfg.trunk.vocab_size)


def _head_example(cfg: BitLMConfig):
    m, p, e = cfg.block_tokens, cfg.head.bits, cfg.trunk.embed_dim
    if cfg.head_kind == "softmax":
        return (jnp.zeros((1, m, e)),)
    return jnp.zeros((1, m, p)), jnp.zeros((1,)), jnp.zeros((1, m, e)), jnp.zeros((1,), bool)


def _boxed_init(key, cfg: BitLMConfig):
    k_trunk, k_head = jax.random.split(key)
    ids = jnp.zeros((1, cfg.block_tokens), jnp.int32)
    return {"backbone": Backbone(cfg).init(k_trunk, ids, with_start=True)["params"],
            "head": _head_module(cfg).init(k_head, *_head_example(cfg))["params"]}


def init_bitlm_params(key: jax.Array, cfg: BitLMConfig) -> dict:
    """Random parameters (N(0, 0.02) weights, zero biases; zero adaLN/output in the head)."""
    return jax.jit(lambda k: nn.unbox(_boxed_init(k, cfg)))(key)


def param_logical_axes(cfg: BitLMConfig) -> dict:
    """Pytree matching ``init_bitlm_params`` whose leaves are PartitionSpecs of logical names."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _boxed_init(jax.random.key(0), cfg)))


def input_segments(segments: jax.Array, block_tokens: int) -> jax.Array:
    """Segment ids [B, T] of the target ids -> those of the backbone's input [B, T]: the start
    block takes the row's first segment, input position j >= m that of x_{j−m} (the id it holds)."""
    return jnp.concatenate([jnp.repeat(segments[:, :1], block_tokens, axis=1),
                            segments[:, :-block_tokens]], axis=1)


def backbone_states(params: dict, ids: jax.Array, *, cfg: BitLMConfig, key: jax.Array | None = None,
                    train: bool = False, segments: jax.Array | None = None) -> jax.Array:
    """ids [B, T] -> states [B, T, E]: position j conditions target x_j (the next-block shift).

    ``segments`` [B, T] (int, None = one document per row): packed rows. An input position then
    attends only to positions of its own segment (``input_segments``), so no state mixes
    documents; a target just after a boundary is conditioned on the previous document's states,
    as the next token after a boundary is in a segment-masked AR model."""
    rngs = {"dropout": key} if train and key is not None else None
    mask = None
    if segments is not None:
        seg = input_segments(segments, cfg.block_tokens)
        mask = attention.segment_mask(seg, seg)
    states, _ = Backbone(cfg).apply({"params": params["backbone"]}, ids[:, :-cfg.block_tokens],
                                    with_start=True, train=train, rngs=rngs, mask=mask)
    return states


def init_backbone_cache(cfg: BitLMConfig, batch: int) -> ar.KVCache:
    """Empty cache of T + m positions: the sampler appends the last decoded block too (unread)."""
    return ar.init_kv_cache(cfg.trunk, batch, cfg.trunk.seq_len + cfg.block_tokens)


def backbone_extend(params: dict, cache: ar.KVCache, ids: jax.Array, *, cfg: BitLMConfig,
                    with_start: bool) -> tuple[jax.Array, ar.KVCache]:
    """Append ids [B, C] (C a multiple of m; after the start block when ``with_start``) to the
    cache; returns the states of the last block written [B, m, E] and the cache."""
    states, cache = Backbone(cfg).apply({"params": params["backbone"]}, ids, with_start=with_start,
                                        cache=cache)
    return states[:, -cfg.block_tokens:], cache


def head_predict(params: dict, z: jax.Array, t: jax.Array, states: jax.Array, drop: jax.Array, *,
                 cfg: BitLMConfig) -> jax.Array:
    """The diffusion head: x̂ [N, M, P] of noisy bits z [N, M, P] at times t [N]."""
    return BitHead(cfg.head).apply({"params": params["head"]}, z, t, states, drop)


def slot_logits(params: dict, states: jax.Array, *, cfg: BitLMConfig) -> jax.Array:
    """The softmax control's logits [..., V] (float32) of states [..., E]."""
    return SlotSoftmax(cfg.trunk.vocab_size).apply({"params": params["head"]}, states).astype(jnp.float32)


def bitlm_loss(params: dict, ids: jax.Array, codes: jax.Array, key: jax.Array, *, cfg: BitLMConfig,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss of one batch: ids [B, T], codes [B, T, P] (±1, the ids' bit codes).

    Diffusion head: every block of m targets gets ``batch_mul`` draws of (t, ε, dropped?) and the
    flow x-prediction loss (spec §B.5), mean over draws. Softmax control: next-block cross-entropy
    (nats per token). aux: ``{"x_mse"}`` (unweighted) or ``{"accuracy"}``.
    """
    k_drop, k_t, k_eps, k_cond = jax.random.split(key, 4)
    states = backbone_states(params, ids, cfg=cfg, key=k_drop, train=train)  # [B, T, E]
    if cfg.head_kind == "softmax":
        logits = slot_logits(params, states, cfg=cfg)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()
        return loss, {"accuracy": (jnp.argmax(logits, -1) == ids).mean()}
    m, p = cfg.block_tokens, cfg.head.bits
    n = ids.shape[0] * cfg.n_blocks * cfg.batch_mul
    cond = jnp.tile(states.reshape(-1, m, states.shape[-1]), (cfg.batch_mul, 1, 1))  # [n, M, E]
    x = jnp.tile(codes.astype(jnp.float32).reshape(-1, m, p), (cfg.batch_mul, 1, 1))
    t = sample_train_times(k_t, n, mean=cfg.t_mean, std=cfg.t_std)
    z = t[:, None, None] * x + (1 - t[:, None, None]) * jax.random.normal(k_eps, x.shape)
    drop = jax.random.bernoulli(k_cond, cfg.cond_dropout, (n,))
    x_hat = head_predict(params, z, t, cond, drop, cfg=cfg)
    loss = flow_x_loss(x, x_hat, t, v_floor=cfg.v_floor).mean()
    return loss, {"x_mse": jnp.square(x - x_hat).mean()}
