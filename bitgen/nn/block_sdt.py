"""Block SDT: CoBit's denoiser over blocks of m tokens, causal across blocks (Block CoBit).

The network is the SDT (``bitgen.nn.sdt``) with two changes:

* attention is block-causal (full inside a block of m tokens, causal across blocks, with a KV
  cache), or follows an explicit mask (the training row below);
* σ conditioning is per token instead of per row. A row carries a list of noise *levels*
  ``levels`` [B, L]; ``level_of_token`` [C] (static) says which level each token takes. The σ
  embedding and every adaLN modulation are computed once per level and gathered to the tokens.

Parameter names and shapes are the SDT's exactly, so one tree (``bitgen.diffusion.denoiser.
init_params``) serves both. With m = T and one level the network computes what the SDT computes.

Training row (BD3-LM style): the concatenation [noisy row (T tokens), clean row (T tokens)], both
at positions 0..T−1. Noisy block b sees noisy block b and clean blocks < b; clean block b sees
clean blocks ≤ b (``training_mask``). Noisy block b takes level b (its own σ), clean tokens take
level n = T/m, the fixed ``clean_sigma``; a clean token's self-conditioning input is its own bits.
Sampling sees the same thing: the clean blocks sit in the KV cache, the noisy block is denoised
against it (``block_residual`` with a cache, the cache it writes is dropped).

Shape letters: B batch, C tokens of a chunk, P bits per token, L levels per row, E width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitgen.config import DiffusionConfig, ModelConfig, check_bit_constants
from bitgen.diffusion.bit_constants import DATA_CENTER, SIGMA_DATA
from bitgen.diffusion.denoiser import combine_logits, denoised_mean
from bitgen.diffusion.loss import loss_from_logits
from bitgen.nn.attention import Attention, KVCache, init_cache, segment_mask
from bitgen.nn.layers import (Dropout, SwiGLU, constrain, dense, layer_norm, residual_cotangent_once,
                              xavier_uniform, zeros)
from bitgen.nn.sdt import positional_features, sigma_frequencies, swiglu_hidden

Array = jax.Array


class LevelAdaLN(nn.Module):
    """adaLN-Zero (``bitgen.nn.layers.AdaLNZero``, same parameter) with one condition per level.

    x [B, N, d]; cond [B, L, c]; index int [N]: the level of each position. Returns
    h = (1 + s) LN(x) + b and the gate g, both [B, N, d], (s, b, g) gathered from the levels.
    """

    features: int
    axes: tuple = ("embed", "mlp")
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array, index: Array) -> tuple[Array, Array]:
        mod = dense(3 * self.features, self.axes, name="mlp_1", dtype=self.dtype,
                    kernel_init=zeros)(nn.silu(cond))
        scale, shift, gate = jnp.split(jnp.take(mod, index, axis=1), 3, axis=-1)
        return (1 + scale) * layer_norm(x) + shift, gate


class BlockLayer(nn.Module):
    """``SDTBlock`` with per-token modulation and a block-causal (or given) attention mask."""

    cfg: ModelConfig
    block_size: int | None
    train: bool = False

    @nn.compact
    def __call__(self, x: Array, t_emb: Array, index: Array, cache: KVCache | None,
                 positions: Array | None, mask: Array | None) -> tuple[Array, KVCache | None]:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        drop = Dropout(cfg.dropout, deterministic=not self.train)
        x = residual_cotangent_once(x)
        h, gate = LevelAdaLN(cfg.embed_dim, dtype=dtype, name="adaln1")(x, t_emb, index)
        y, cache = Attention(cfg.n_heads, block_size=self.block_size, dropout=cfg.dropout,
                             rope_base=cfg.rope_base, max_positions=cfg.seq_tokens,
                             implementation=cfg.attention, dtype=dtype,
                             name="attn")(h, cache=cache, mask=mask, positions=positions,
                                          train=self.train)
        x = x + drop(y) * gate
        h, gate = LevelAdaLN(cfg.embed_dim, dtype=dtype, name="adaln2")(x, t_emb, index)
        y = SwiGLU(swiglu_hidden(cfg), dropout=cfg.dropout, dtype=dtype, name="ff")(h, train=self.train)
        x = x + drop(y) * gate
        return constrain(x, ("batch", "seq", "embed")), cache


class LevelHead(nn.Module):
    """``OptimalSkipMLPHead`` (same parameters) whose time input is per level, gathered per bit.

    x_rec [B, N, C'], content [B, N, 2C'], tokens [B, N/P, E], t_emb [B, L, E], index int [N]
    (each bit's level) -> logits [B, N, 1].
    """

    cfg: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, x_rec, content, tokens, t_emb, index):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        batch, n_bits, _ = x_rec.shape
        hidden = cfg.head_hidden
        global_feat = dense(cfg.patch_size * hidden, ("embed", "head_hidden"), name="patch_adapter",
                            dtype=dtype, kernel_init=xavier_uniform)(tokens)
        local_feat = dense(hidden, ("content", "head_hidden"), name="input_adapter", dtype=dtype,
                           kernel_init=xavier_uniform)(jnp.concatenate([x_rec, content], axis=-1))
        h = global_feat.reshape(batch, n_bits, hidden) + local_feat
        t_h = dense(hidden, ("embed", "head_hidden"), name="time_proj", dtype=dtype)(t_emb)
        h, gate = LevelAdaLN(hidden, axes=("head_hidden", None), dtype=dtype, name="adaln")(h, t_h, index)
        h = dense(hidden, ("head_hidden", None), name="mixer_0", dtype=dtype)(h * gate)
        h = Dropout(cfg.dropout, deterministic=not self.train)(nn.silu(h))
        return dense(1, ("head_hidden", None), name="mixer_3", dtype=dtype)(h)


class BlockSDT(nn.Module):
    """The SDT over a chunk of C tokens with per-token σ levels.

    ``__call__(x, levels, x0_hat, level_of_token, *, cache, positions, mask, head)``: x [B, C·P]
    (noisy or clean bits), levels σ [B, L] > 0, x0_hat [B, C·P] (the self-conditioning estimate,
    zeros = none), level_of_token int [C]. ``block_size``: the structural mask (m; None = only
    ``mask``). cache: one ``KVCache`` per trunk block or None. ``head=False`` stops after the
    trunk (appending clean blocks needs no logits). Returns (f_θ [B, C·P] float32 or None, cache).
    """

    cfg: ModelConfig
    block_size: int | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x: Array, levels: Array, x0_hat: Array, level_of_token: Array, *,
                 cache: tuple[KVCache, ...] | None = None, positions: Array | None = None,
                 mask: Array | None = None, head: bool = True):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        batch, n_bits = x.shape
        p = cfg.patch_size
        levels = levels.astype(jnp.float32)
        bit_levels = jnp.repeat(jnp.asarray(level_of_token), p)
        c_in = jnp.take(1.0 / jnp.sqrt(levels**2 + SIGMA_DATA**2), bit_levels, axis=1)  # [B, C·P]
        noisy_in = (x.astype(jnp.float32) - DATA_CENTER) * c_in
        sc_in = (x0_hat.astype(jnp.float32) - DATA_CENTER) * c_in
        input_proj = dense(cfg.content_dim, (None, "content"), name="cont_input_proj", dtype=dtype)
        channels = input_proj(jnp.stack([noisy_in, sc_in])[..., None])  # same weights for both
        content = jnp.concatenate([channels[0], channels[1]], axis=-1)  # [B, C·P, 2C']
        pos = jnp.asarray(positional_features(n_bits, cfg), dtype=content.dtype)
        per_bit = jnp.concatenate([content, jnp.broadcast_to(pos, (batch,) + pos.shape)], axis=-1)
        patches = per_bit.reshape(batch, n_bits // p, p * per_bit.shape[-1])
        tokens = dense(cfg.embed_dim, ("patch_in", "embed"), name="patch_proj", dtype=dtype)(patches)
        tokens = constrain(tokens, ("batch", "seq", "embed"))

        phases = jnp.log(levels)[..., None] * jnp.asarray(sigma_frequencies(cfg.embed_dim))
        even = (jnp.arange(cfg.embed_dim) % 2) == 0
        time_feats = jnp.where(even, jnp.cos(phases), jnp.sin(phases))  # [B, L, E]
        t_emb = dense(cfg.embed_dim, ("embed", "mlp"), name="time_proj", dtype=dtype,
                      use_bias=False)(time_feats)
        t_emb = dense(cfg.embed_dim, ("mlp", "embed"), name="time_cond", dtype=dtype)(t_emb)

        layer_cls = nn.remat(BlockLayer) if cfg.remat else BlockLayer
        written = []
        for i in range(cfg.n_blocks):
            tokens, layer_cache = layer_cls(cfg, self.block_size, train=self.train, name=f"blocks_{i}")(
                tokens, t_emb, jnp.asarray(level_of_token), None if cache is None else cache[i],
                positions, mask)
            written.append(layer_cache)
        written = None if cache is None else tuple(written)
        if not head:
            return None, written
        unpatched = dense(p * cfg.content_dim, ("embed", "content"), name="unpatch_proj_content",
                          dtype=dtype)(tokens)
        x_rec = unpatched.reshape(batch, n_bits, cfg.content_dim)
        logits = LevelHead(cfg, train=self.train, name="head")(x_rec, content, tokens, t_emb, bit_levels)
        return logits[..., 0].astype(jnp.float32), written


# --------------------------------------------------------------------------------------------------
# The training row and the cache


def training_mask(seq_tokens: int, block_tokens: int) -> np.ndarray:
    """bool [1, 1, 2T, 2T] over [noisy row, clean row]: noisy block b sees noisy block b and clean
    blocks < b; clean block b sees clean blocks ≤ b; nothing sees a later block or noisy from clean."""
    half = np.arange(2 * seq_tokens) // seq_tokens  # 0 noisy, 1 clean
    block = (np.arange(2 * seq_tokens) % seq_tokens) // block_tokens
    qh, kh, qb, kb = half[:, None], half[None, :], block[:, None], block[None, :]
    noisy_query = (qh == 0) & (((kh == 0) & (kb == qb)) | ((kh == 1) & (kb < qb)))
    clean_query = (qh == 1) & (kh == 1) & (kb <= qb)
    return (noisy_query | clean_query)[None, None]


def training_positions(seq_tokens: int) -> np.ndarray:
    """int32 [2T]: both copies of the row at positions 0..T−1 (RoPE sees one row)."""
    return np.tile(np.arange(seq_tokens, dtype=np.int32), 2)


def training_levels(seq_tokens: int, block_tokens: int) -> np.ndarray:
    """int32 [2T]: noisy token j takes level j // m (its block's σ); clean tokens take level T/m."""
    noisy = np.arange(seq_tokens, dtype=np.int32) // block_tokens
    return np.concatenate([noisy, np.full(seq_tokens, seq_tokens // block_tokens, np.int32)])


def init_block_cache(cfg: ModelConfig, batch: int) -> tuple[KVCache, ...]:
    """An empty cache of T positions per trunk block, in the compute dtype."""
    head_dim = cfg.embed_dim // cfg.n_heads
    return tuple(init_cache(batch, cfg.seq_tokens, cfg.n_heads, head_dim, jnp.dtype(cfg.compute_dtype))
                 for _ in range(cfg.n_blocks))


def training_residual(params, noisy: Array, clean: Array, sigma: Array, x0_hat: Array, *,
                      cfg: ModelConfig, block_tokens: int, clean_sigma: float,
                      key: jax.Array | None = None, train: bool = False,
                      segments: Array | None = None) -> Array:
    """f_θ [B, S] of the noisy row in one pass over [noisy, clean] (module docstring).

    noisy, clean, x0_hat: [B, S] (x0_hat for the noisy row; clean tokens self-condition on their
    own bits); sigma [B, n]: each block's σ. ``key``: dropout (needed when training with it).
    ``segments`` int [B, T] (None = one document per row): packed rows, where a token of either
    copy attends only to tokens of its own document on top of ``training_mask``.
    """
    batch, seq_bits = noisy.shape
    levels = jnp.concatenate([sigma.astype(jnp.float32),
                              jnp.full((batch, 1), clean_sigma, jnp.float32)], axis=1)
    clean = clean.astype(jnp.float32)
    rngs = {"dropout": key} if train and cfg.dropout > 0.0 else {}
    mask = training_mask(cfg.seq_tokens, block_tokens)
    if segments is not None:
        both = jnp.tile(segments, (1, 2))  # the noisy and the clean copy of each token
        mask = mask & segment_mask(both, both)
    f_theta, _ = BlockSDT(cfg, train=train).apply(
        {"params": params}, jnp.concatenate([noisy, clean], axis=1), levels,
        jnp.concatenate([x0_hat, clean], axis=1), training_levels(cfg.seq_tokens, block_tokens),
        positions=training_positions(cfg.seq_tokens), mask=mask, rngs=rngs)
    return f_theta[:, :seq_bits]


def block_residual(params, cache: tuple[KVCache, ...], x: Array, sigma: Array, x0_hat: Array, *,
                   cfg: ModelConfig, block_tokens: int) -> Array:
    """f_θ [B, m·P] of one noisy block x [B, m·P] at σ [B], after the clean blocks in ``cache``
    (the block is written to a copy of the cache that is dropped)."""
    f_theta, _ = BlockSDT(cfg, block_size=block_tokens).apply(
        {"params": params}, x, sigma[:, None], x0_hat, np.zeros(block_tokens, np.int32), cache=cache)
    return f_theta


def append_clean(params, cache: tuple[KVCache, ...], bits: Array, *, cfg: ModelConfig,
                 block_tokens: int, clean_sigma: float) -> tuple[KVCache, ...]:
    """Write clean blocks bits [B, k·m·P] (k ≥ 1 whole blocks) to the cache in one call."""
    bits = bits.astype(jnp.float32)
    levels = jnp.full((bits.shape[0], 1), clean_sigma, jnp.float32)
    tokens = bits.shape[1] // cfg.patch_size
    _, cache = BlockSDT(cfg, block_size=block_tokens).apply(
        {"params": params}, bits, levels, bits, np.zeros(tokens, np.int32), cache=cache, head=False)
    return cache


# --------------------------------------------------------------------------------------------------
# Loss


def block_cobit_loss(params, bits: Array, sigma: Array, key: jax.Array, *, cfg: ModelConfig,
                     diffusion_cfg: DiffusionConfig, block_tokens: int, clean_sigma: float,
                     train: bool = True, segments: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """CoBit's loss (``bitgen.diffusion.loss``) with one σ per block: bits [B, S] in {0,1},
    sigma [B, n] (n = T/m), key for ε, the self-conditioning draw and dropout.

    x_t = b + σ_block·ε on the noisy row; self-conditioning as CoBit's trainer (a gradient-free
    first pass on rows drawn with ``self_condition_prob``), except that the first pass feeds a
    zero estimate (the samplers' first-step input) rather than the SDT's un-centred-zero quirk.
    Logits and loss are CoBit's per block (a block is a "row" of m·P bits with its σ), so the
    loss is the mean over all blocks and bits. aux: ``mse_per_block`` / ``loss_per_block`` [B, n]
    and ``sc_mask`` [B]. ``segments`` [B, T]: packed rows (``training_residual``).
    """
    check_bit_constants(diffusion_cfg)
    batch, seq_bits = bits.shape
    n, block_bits = sigma.shape[1], block_tokens * cfg.patch_size
    if n * block_bits != seq_bits:
        raise ValueError(f"sigma {sigma.shape} must hold one σ per block of {block_bits} bits of {bits.shape}")
    key_noise, key_sc, key_bootstrap, key_main = jax.random.split(key, 4)
    sigma = sigma.astype(jnp.float32)
    clean = bits.astype(jnp.float32)
    noise = jax.random.normal(key_noise, bits.shape, jnp.float32)
    x_t = jnp.repeat(sigma, block_bits, axis=1) * noise + clean

    def by_block(values):  # [B, S] -> [B·n, m·P]: each block is one CoBit "row"
        return values.reshape(batch * n, block_bits)

    def logits(x0_hat, k):
        f_theta = training_residual(params, x_t, clean, sigma, x0_hat, cfg=cfg, block_tokens=block_tokens,
                                    clean_sigma=clean_sigma, key=k, train=train, segments=segments)
        return combine_logits(by_block(f_theta), by_block(x_t), sigma.reshape(-1), cfg=cfg)

    x0_hat = jnp.zeros_like(x_t)
    sc_mask = jax.random.uniform(key_sc, (batch,)) < diffusion_cfg.self_condition_prob
    if diffusion_cfg.self_condition_prob > 0.0:
        estimate = denoised_mean(jax.lax.stop_gradient(logits(x0_hat, key_bootstrap)))
        x0_hat = jnp.where(sc_mask[:, None], estimate.reshape(batch, seq_bits), 0.0)
    loss, aux = loss_from_logits(logits(x0_hat, key_main), by_block(bits), sigma.reshape(-1),
                                 loss_type=diffusion_cfg.loss_type,
                                 weighting=diffusion_cfg.loss_weighting, sigma_data=SIGMA_DATA)
    return loss, {"mse_per_block": aux["mse_per_sample"].reshape(batch, n),
                  "loss_per_block": aux["loss_per_sample"].reshape(batch, n), "sc_mask": sc_mask}
