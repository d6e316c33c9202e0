"""SDT: the CoBit sequence diffusion transformer over bit patches (spec §2).

``SDT(cfg)(x_t, sigma, x0_hat)`` returns the raw residual logit f_θ per bit, [B, S] float32; the
matched filter is added outside (``bitgen.diffusion.denoiser``). Submodule and parameter names
mirror the official PyTorch state dict (``blocks.0.adaln1.mlp.1.weight`` ↔
``blocks_0/adaln1/mlp_1/kernel``), so checkpoint conversion is a rename plus a transpose.

Shape letters: B batch, S = T·P bits, T tokens (patches), P bits per patch, C content width,
E trunk width, H head width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitgen.config import ModelConfig
from bitgen.diffusion.bit_constants import DATA_CENTER, SIGMA_DATA
from bitgen.nn.attention import Attention
from bitgen.nn.layers import (AdaLNZero, Dropout, SwiGLU, constrain, dense, residual_cotangent_once,
                              xavier_uniform)

Array = jax.Array

def pos_dim(cfg: ModelConfig) -> int:
    """Per-bit positional feature width: 2·global + 2·local Fourier features + 1 centre distance."""
    return 2 * cfg.n_fourier_global + 2 * cfg.n_fourier_local + 1


def patch_dim_in(cfg: ModelConfig) -> int:
    """patch_proj input width P·(2C + pos_dim)."""
    return cfg.patch_size * (2 * cfg.content_dim + pos_dim(cfg))


def swiglu_hidden(cfg: ModelConfig) -> int:
    return int(2 * cfg.dim_ff / 3)


def sigma_frequencies(embed_dim: int) -> np.ndarray:
    """[E] float32: the reference's ``time_fn._freq`` buffer, ``10000^(-2k/E)`` repeated per pair.

    Computed in float64 and rounded once (the reference's float32 ``exp`` differs by ≤1 ulp).
    """
    freq = np.exp(-math.log(10000.0) * np.arange(0, embed_dim, 2, dtype=np.float64) / embed_dim)
    return np.repeat(freq, 2).astype(np.float32)


def positional_features(seq_bits: int, cfg: ModelConfig) -> np.ndarray:
    """[S, pos_dim] float32 per-bit features in ``local_only`` mode (spec §2 step 2).

    Global Fourier features are all zero (kept for the reference's shape); local features use the
    bit's index inside its patch, l = i mod P: ``sin/cos(l·2πk/(P-1))`` for k = 1..n_local, then
    ``|l - (P-1)/2| / ((P-1)/2)``. Float32 throughout, as the reference computes them.
    """
    p = cfg.patch_size
    f32 = np.float32
    local = (np.arange(seq_bits, dtype=f32) % f32(p)).astype(f32)
    k = np.arange(1, cfg.n_fourier_local + 1, dtype=f32)
    omega = (f32(2.0 * math.pi) * k / f32(max(p - 1, 1))).astype(f32)
    phase = (local[:, None] * omega[None, :]).astype(f32)
    centre = (p - 1) / 2.0
    dist = (np.abs(local - f32(centre)) / f32(max(centre, 1e-6))).astype(f32)
    return np.concatenate(
        [np.zeros((seq_bits, 2 * cfg.n_fourier_global), f32), np.sin(phase), np.cos(phase),
         dist[:, None]], axis=-1).astype(f32)


class SDTBlock(nn.Module):
    """``x += Drop(Attn(ada1(x)))·g1; x += Drop(SwiGLU(ada2(x)))·g2`` (PreNormBlockAda)."""

    cfg: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, x: Array, t_emb: Array) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        drop = Dropout(cfg.dropout, deterministic=not self.train)
        x = residual_cotangent_once(x)
        h, gate = AdaLNZero(cfg.embed_dim, dtype=dtype, name="adaln1")(x, t_emb)
        y, _ = Attention(cfg.n_heads, dropout=cfg.dropout, rope_base=cfg.rope_base,
                         implementation=cfg.attention, dtype=dtype, name="attn")(h, train=self.train)
        self.sow("intermediates", "attn_out", y)
        x = x + drop(y) * gate[:, None, :]
        h, gate = AdaLNZero(cfg.embed_dim, dtype=dtype, name="adaln2")(x, t_emb)
        y = SwiGLU(swiglu_hidden(cfg), dropout=cfg.dropout, dtype=dtype, name="ff")(h, train=self.train)
        self.sow("intermediates", "ff_out", y)
        x = x + drop(y) * gate[:, None, :]
        return constrain(x, ("batch", "seq", "embed"))


class OptimalSkipMLPHead(nn.Module):
    """Per-bit head: ``mixer(adaLN(patch_adapter(tokens) + input_adapter([x_rec, content])) ⊙ g)``.

    Its adaLN gate starts at 0, so the residual logit is exactly 0 at init.
    """

    cfg: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, x_rec: Array, content: Array, tokens: Array, t_emb: Array) -> Array:
        """x_rec [B,S,C], content [B,S,2C], tokens [B,T,E], t_emb [B,E] -> logits [B,S,1]."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        batch, seq_bits, _ = x_rec.shape
        hidden = cfg.head_hidden
        global_feat = dense(cfg.patch_size * hidden, ("embed", "head_hidden"), name="patch_adapter",
                            dtype=dtype, kernel_init=xavier_uniform)(tokens)
        self.sow("intermediates", "patch_adapter_out", global_feat)
        local_in = jnp.concatenate([x_rec, content], axis=-1)
        self.sow("intermediates", "input_adapter_in", local_in)
        local_feat = dense(hidden, ("content", "head_hidden"), name="input_adapter", dtype=dtype,
                           kernel_init=xavier_uniform)(local_in)
        self.sow("intermediates", "input_adapter_out", local_feat)
        h = global_feat.reshape(batch, seq_bits, hidden) + local_feat
        t_h = dense(hidden, ("embed", "head_hidden"), name="time_proj", dtype=dtype)(t_emb)
        self.sow("intermediates", "time_proj_out", t_h)
        h, gate = AdaLNZero(hidden, axes=("head_hidden", None), dtype=dtype, name="adaln")(h, t_h)
        h = dense(hidden, ("head_hidden", None), name="mixer_0", dtype=dtype)(h * gate[:, None, :])
        self.sow("intermediates", "mixer_0_out", h)
        h = Dropout(cfg.dropout, deterministic=not self.train)(nn.silu(h))
        return dense(1, ("head_hidden", None), name="mixer_3", dtype=dtype)(h)


def _head_on_chunk(head: OptimalSkipMLPHead, chunk_index: Array, x_rec: Array, content: Array,
                   tokens: Array, t_emb: Array) -> tuple[Array, Array]:
    """Scan body: the head on chunk ``chunk_index`` of the whole-sequence inputs.

    Slicing inside the body (rather than scanning over chunk-major copies of the inputs) keeps
    XLA from materialising transposed copies of the [B, S, ·] inputs.
    """
    chunk = head.cfg.head_chunk_tokens
    bits = chunk * head.cfg.patch_size

    def take(x: Array, size: int) -> Array:
        return jax.lax.dynamic_slice_in_dim(x, chunk_index * size, size, axis=1)

    logits = head(take(x_rec, bits), take(content, bits), take(tokens, chunk), t_emb)
    return chunk_index + 1, logits


def apply_head(head: OptimalSkipMLPHead, x_rec: Array, content: Array, tokens: Array,
               t_emb: Array) -> Array:
    """Run ``head`` on the whole sequence, or over ``head.cfg.head_chunk_tokens``-token chunks.

    Shapes as ``OptimalSkipMLPHead.__call__``; returns logits [B, S, 1]. Chunked, the head is a
    rematerialised ``nn.scan`` over the chunk axis: every per-bit layer is row-wise, so each chunk
    (its tokens and their P bits each) is independent and the backward pass holds one chunk's
    [B, chunk·P, H] activations at a time instead of ~10 whole-sequence ones. Parameters are
    broadcast (same names and shapes as unchunked), dropout gets a fresh key per chunk, and the
    intermediates are stacked over a leading chunk axis.
    """
    chunk = head.cfg.head_chunk_tokens
    if not chunk:
        return head(x_rec, content, tokens, t_emb)
    batch, seq_tokens, _ = tokens.shape
    if seq_tokens % chunk:
        raise ValueError(f"model.head_chunk_tokens={chunk} does not divide the {seq_tokens} tokens "
                         "of the input; choose a divisor of seq_tokens or 0 (off)")
    scan = nn.scan(nn.remat(_head_on_chunk), variable_broadcast="params",
                   variable_axes={"intermediates": 0},
                   split_rngs={"params": False, "dropout": True},
                   in_axes=nn.broadcast, out_axes=1, length=seq_tokens // chunk)
    _, logits = scan(head, jnp.zeros((), jnp.int32), x_rec, content, tokens, t_emb)
    return logits.reshape(batch, x_rec.shape[1], 1)  # [B, n_chunks, chunk·P, 1] -> [B, S, 1]


def bit_output(module: nn.Module, cfg: ModelConfig, tokens: Array, content: Array, t_emb: Array, *,
               train: bool) -> Array:
    """The SDT after its trunk (steps 6-7): un-patch the trunk tokens [B, T, E] into per-bit content
    features, then the per-bit head -> f_θ [B, S] float32. content: the input channels [B, S, 2C];
    t_emb: [B, E]. Called inside ``module``'s compact method, so its layers are ``module``'s
    (``unpatch_proj_content``, ``head``) and its intermediates are sown there."""
    dtype = jnp.dtype(cfg.compute_dtype)
    batch, seq_bits = content.shape[:2]
    unpatched = dense(cfg.patch_size * cfg.content_dim, ("embed", "content"),
                      name="unpatch_proj_content", dtype=dtype)(tokens)
    module.sow("intermediates", "unpatch_proj_content_out", unpatched)
    x_rec = unpatched.reshape(batch, seq_bits, cfg.content_dim)
    logits = apply_head(OptimalSkipMLPHead(cfg, train=train, name="head"), x_rec, content, tokens, t_emb)
    module.sow("intermediates", "head_out", logits)
    return logits[..., 0].astype(jnp.float32)


class SDT(nn.Module):
    """SequenceVDTContinuousModel with the ``optimal_skip_mlp`` head (continuous bits, SC on).

    ``__call__(x_t, sigma, x0_hat)``: x_t [B,S] float, sigma [B] > 0, x0_hat [B,S] in [0,1] or
    None. ``None`` reproduces the reference trainer's self-conditioning bootstrap pass, which feeds
    an *un-centred* zero to the SC channel (cont_input_proj(0) = bias); an all-zeros tensor is
    centred like any estimate ((0 - 0.5)·c_in) and is what "no self-conditioning" means elsewhere.
    Returns f_θ [B,S] float32. Intermediates are sown into the ``intermediates`` collection.
    """

    cfg: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, x_t: Array, sigma: Array, x0_hat: Array | None) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        batch, seq_bits = x_t.shape
        p = cfg.patch_size
        tokens_per_seq = seq_bits // p
        sigma = sigma.astype(jnp.float32)

        # 1. Shared Linear(1 -> C) on the scaled noisy and self-conditioning channels (float32 in).
        c_in = (1.0 / jnp.sqrt(sigma**2 + SIGMA_DATA**2))[:, None]
        noisy_in = (x_t.astype(jnp.float32) - DATA_CENTER) * c_in
        if x0_hat is None:
            sc_in = jnp.zeros_like(noisy_in)
        else:
            sc_in = (x0_hat.astype(jnp.float32) - DATA_CENTER) * c_in
        input_proj = dense(cfg.content_dim, (None, "content"), name="cont_input_proj", dtype=dtype)
        channels_in = jnp.stack([noisy_in, sc_in])[..., None]  # [2, B, S, 1]
        self.sow("intermediates", "cont_input_proj_in", channels_in)
        channels = input_proj(channels_in)  # same weights for both channels
        self.sow("intermediates", "cont_input_proj_out", channels)
        content = jnp.concatenate([channels[0], channels[1]], axis=-1)  # [B, S, 2C]

        # 2-3. Per-bit positional features, then bit patching: one token = one patch of P bits.
        pos = jnp.asarray(positional_features(seq_bits, cfg), dtype=content.dtype)
        per_bit = jnp.concatenate([content, jnp.broadcast_to(pos, (batch,) + pos.shape)], axis=-1)
        patches = per_bit.reshape(batch, tokens_per_seq, p * per_bit.shape[-1])
        self.sow("intermediates", "patch_proj_in", patches)
        tokens = dense(cfg.embed_dim, ("patch_in", "embed"), name="patch_proj", dtype=dtype)(patches)
        tokens = constrain(tokens, ("batch", "seq", "embed"))
        self.sow("intermediates", "patch_proj_out", tokens)

        # 4. sigma embedding: interleaved cos/sin of ln(sigma)·f_k, two Linears, no activation.
        phases = jnp.log(sigma)[:, None] * jnp.asarray(sigma_frequencies(cfg.embed_dim))
        even = (jnp.arange(cfg.embed_dim) % 2) == 0
        time_feats = jnp.where(even, jnp.cos(phases), jnp.sin(phases))
        self.sow("intermediates", "time_fn_out", time_feats)
        t_emb = dense(cfg.embed_dim, ("embed", "mlp"), name="time_proj", dtype=dtype,
                      use_bias=False)(time_feats)
        self.sow("intermediates", "time_proj_out", t_emb)
        t_emb = dense(cfg.embed_dim, ("mlp", "embed"), name="time_cond", dtype=dtype)(t_emb)
        self.sow("intermediates", "time_cond_out", t_emb)

        # 5. Trunk of adaLN-Zero blocks (no final norm).
        block_cls = nn.remat(SDTBlock) if cfg.remat else SDTBlock
        for i in range(cfg.n_blocks):
            tokens = block_cls(cfg, train=self.train, name=f"blocks_{i}")(tokens, t_emb)
            self.sow("intermediates", f"blocks_{i}_out", tokens)

        return bit_output(self, cfg, tokens, content, t_emb, train=self.train)
