"""The bitwise diffusion head of BitLM (spec §A.4, the BitDance parallel head of §B.4) and its
flow-matching x-prediction loss (§A.5 / §B.5).

Time convention (BitDance's): t ∈ [0, 1], t = 0 pure noise, t = 1 data. Bits x ∈ {−1, +1},
noise ε ~ N(0, I), noisy state ``z_t = t·x + (1−t)·ε``. The head predicts the clean bits
``x̂ = f(z_t, t, c)`` of the m tokens of one block jointly (self-attention across the m slots),
each slot conditioned on its own backbone state ``c`` and one ``t`` per block.

Shape letters: N blocks (rows × blocks per row), M tokens per block (m), P bits per token,
E backbone width, C head width.

Public API:
  BitHeadConfig
  BitHead(cfg)(z [N,M,P], t [N], cond [N,M,E], drop [N] bool | None) -> x̂ [N,M,P] float32
  sample_train_times(key, n, *, mean, std) -> t [n]            # logit-normal
  flow_x_loss(x, x_hat, t, *, v_floor) -> per-block loss [N]  # mean_bits (x−x̂)²/max(1−t, v_floor)²
  posterior_mean(z, t, support, probs) -> E[x | z_t]             # exact, for a finite support
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitgen.nn.attention import Attention
from bitgen.nn.layers import SwiGLU, dense, layer_norm, normal_002, zeros

Array = jax.Array


@dataclass(frozen=True)
class BitHeadConfig:
    """bits P per token, block_tokens m; width C, depth (Transformer blocks), heads over the m
    slots; bounded: ``x̂ = tanh(o/2)`` (= 2·sigmoid(o) − 1, BitDance-T2I) instead of raw ``o``."""

    bits: int
    block_tokens: int
    width: int = 128
    depth: int = 2
    n_heads: int = 4
    bounded: bool = True
    time_features: int = 256  # sinusoidal features of 1000·t (cos ‖ sin)

    def __post_init__(self):
        if self.width % self.n_heads:
            raise ValueError(f"BitHeadConfig.width={self.width} must split into n_heads={self.n_heads}")


def time_features(t: Array, n_features: int) -> Array:
    """t [N] -> [N, n_features]: cos ‖ sin of 1000·t at frequencies 10000^(−i/(n/2))."""
    half = n_features // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _modulate(x: Array, scale: Array, shift: Array) -> Array:
    return (1 + scale) * layer_norm(x) + shift


class _HeadBlock(nn.Module):
    """adaLN-Zero Transformer block over the M slots: per-slot modulation from y [N, M, C]."""

    n_heads: int

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        width = x.shape[-1]
        mod = dense(6 * width, ("embed", "mlp"), name="adaln", kernel_init=zeros)(y)
        s1, b1, g1, s2, b2, g2 = jnp.split(mod, 6, axis=-1)
        h, _ = Attention(self.n_heads, block_size=None, use_rope=False, name="attn")(_modulate(x, s1, b1))
        x = x + g1 * h
        return x + g2 * SwiGLU(mlp_hidden(width), name="mlp")(_modulate(x, s2, b2))


def mlp_hidden(width: int) -> int:
    """The SwiGLU hidden size of a head block: 8·C/3 (the usual 4·C at equal parameters) rounded up
    to a multiple of 64, so it divides over tensor-parallel mesh axes of up to 64 devices."""
    return -(-(8 * width // 3) // 64) * 64


class BitHead(nn.Module):
    """z [N, M, P] noisy bits, t [N] (one per block), cond [N, M, E] backbone states, drop [N]
    (True: replace the condition by the learned null condition, the CFG branch) -> x̂ [N, M, P].

    The output layer and every adaLN projection start at zero, so at init x̂ = 0."""

    cfg: BitHeadConfig

    @nn.compact
    def __call__(self, z: Array, t: Array, cond: Array, drop: Array | None = None) -> Array:
        cfg = self.cfg
        width = cfg.width
        t_emb = dense(width, (None, "mlp"), name="time_in")(time_features(t, cfg.time_features))
        t_emb = dense(width, ("mlp", "embed"), name="time_out")(nn.silu(t_emb))
        c_emb = dense(width, ("embed", "mlp"), name="cond_in")(cond.astype(jnp.float32))
        if drop is not None:
            null = self.param("null_cond", nn.with_logical_partitioning(normal_002, ("mlp",)), (width,))
            c_emb = jnp.where(drop[:, None, None], null, c_emb)
        y = nn.silu(t_emb[:, None, :] + c_emb)  # [N, M, C]
        slots = self.param("slot_embed", nn.with_logical_partitioning(normal_002, (None, "embed")),
                           (cfg.block_tokens, width))
        x = dense(width, ("bits", "embed"), name="bits_in")(z.astype(jnp.float32)) + slots
        for i in range(cfg.depth):
            x = _HeadBlock(cfg.n_heads, name=f"block_{i}")(x, y)
        scale, shift = jnp.split(dense(2 * width, ("embed", "mlp"), name="final_adaln",
                                       kernel_init=zeros)(y), 2, axis=-1)
        out = dense(cfg.bits, ("embed", "bits"), name="bits_out", kernel_init=zeros)(
            _modulate(x, scale, shift))
        return jnp.tanh(out / 2) if cfg.bounded else out


def sample_train_times(key: Array, n: int, *, mean: float, std: float) -> Array:
    """Logit-normal times t = sigmoid(u), u ~ N(mean, std²) (BitDance: mean −0.8, std 0.8). [n]."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,), jnp.float32))


def flow_x_loss(x: Array, x_hat: Array, t: Array, *, v_floor: float) -> Array:
    """Velocity-space MSE of an x-prediction: ``mean_bits (x − x̂)² / max(1−t, v_floor)²``.

    x, x_hat [N, ...]; t [N]. Equals ‖v − v̂‖² (mean over bits) for
    ``v = (x − z)/max(1−t, floor)``, since z cancels. Returns [N] float32.
    """
    weight = 1.0 / jnp.square(jnp.maximum(1.0 - t.astype(jnp.float32), v_floor))
    sq = jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32))
    return weight * sq.reshape(sq.shape[0], -1).mean(axis=1)


def posterior_mean(z: Array, t: Array, support: Array, probs: Array) -> Array:
    """E[x | z_t = z] for x drawn from ``probs`` [K] over ``support`` [K, D] (±1 codes).

    z [N, D], t [N] in [0, 1). z_t | x ~ N(t·x, (1−t)² I), so the posterior weight of code k is
    ``probs_k · exp(−‖z − t·x_k‖² / (2(1−t)²))``. Returns [N, D]: the minimiser of the expected
    squared error at each (z, t), i.e. of ``flow_x_loss`` at fixed t.
    """
    sq = jnp.sum(jnp.square(z[:, None, :] - t[:, None, None] * support[None]), axis=-1)  # [N, K]
    log_w = jnp.log(probs)[None] - sq / (2 * jnp.square(1 - t)[:, None])
    return jax.nn.softmax(log_w, axis=-1) @ support
