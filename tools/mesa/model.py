"""One-layer linear causal self-attention of Zheng et al. (2024), its loss and diagnostics.

Tokens e_t = [x_t ; x_{t-1}] in C^{2d} (x_0 = 0). With Params (kq: (2d, 2d), pv: (d, 2d), complex)
the prediction of x_{t+1} is ŷ_t = pv S_t kq e_t / (t-1), S_t = Σ_{i≤t} e_i e_i^H, for t = 2..T-1.

Evaluation is factorised through the sequences' structure (see `features`): for t ≥ 2,
e_t = D z_t with D = [diag(x_1) ; diag(x_1 λ̄)] (2d × d) and z_t = λ^{t-1}, so
S_t = e_1 e_1^H + D Y_t D^H with Y_t = Σ_{i=2}^t z_i z_i^H, and
ŷ_t = [pv e_1 (e_1^H kq D z_t) + (pv D) Y_t (D^H kq D) z_t] / (t-1): O(d²) per token instead of O(d³).
Positions are 1-based in docstrings, 0-based in code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tools.mesa.data import Sequences, powers


class Params(NamedTuple):
    """kq: W^{KQ}, (2d, 2d) complex; pv: W^{PV}, (d, 2d) complex."""

    kq: jax.Array
    pv: jax.Array


class Features(NamedTuple):
    """Parameter-free arrays of m sequences of length T (complex64).

    z: (m, T, d) λ^{t-1}; gram: (m, T, d, d) Y_t; down: (m, 2d, d) D; first: (m, 2d) e_1;
    target: (m, T-2, d) x_{t+1} for t = 2..T-1.
    """

    z: jax.Array
    gram: jax.Array
    down: jax.Array
    first: jax.Array
    target: jax.Array


def diagonal_init(d: int, a0: float = 0.1, b0: float = 0.1) -> Params:
    """The paper's init: kq = [[0, 0], [a0 I, 0]], pv = [b0 I, 0] (complex64)."""
    eye = jnp.eye(d, dtype=jnp.complex64)
    zero = jnp.zeros((d, d), jnp.complex64)
    return Params(jnp.block([[zero, zero], [a0 * eye, zero]]), jnp.concatenate([b0 * eye, zero], axis=1))


def gaussian_init(key: jax.Array, d: int, scale: float) -> Params:
    """Every entry i.i.d. complex normal with E|w|² = scale² (complex64)."""
    k1, k2 = jax.random.split(key)
    return Params(scale * jax.random.normal(k1, (2 * d, 2 * d), jnp.complex64),
                  scale * jax.random.normal(k2, (d, 2 * d), jnp.complex64))


def diagonal_mask(d: int) -> Params:
    """1 on the entries the diagonal dynamics keep (kq[d+j, j], pv[j, j]), 0 elsewhere."""
    return diagonal_init(d, 1.0, 1.0)


def features(seq: Sequences, T: int) -> Features:
    """Precompute the parameter-free factors of `predict` for sequences of length T."""
    z = powers(seq, T)
    outer = z[:, 1:, :, None] * z[:, 1:, None, :].conj()             # z_i z_i^H, i = 2..T
    gram = jnp.concatenate([jnp.zeros_like(outer[:, :1]),
                            jax.lax.associative_scan(jnp.add, outer, axis=1)], axis=1)
    x1 = seq.x1.astype(jnp.complex64)
    down = jnp.concatenate([jax.vmap(jnp.diag)(x1), jax.vmap(jnp.diag)(x1 * z[:, 1].conj())], axis=1)
    first = jnp.concatenate([x1, jnp.zeros_like(x1)], axis=-1)
    return Features(z, gram, down, first, x1[:, None, :] * z[:, 2:])


def predict(params: Params, f: Features) -> jax.Array:
    """(m, T-2, d) predictions ŷ_t of x_{t+1} for t = 2..T-1."""
    z, gram = f.z[:, 1:-1], f.gram[:, 1:-1]
    v_tilde = jnp.einsum("ab,mbj->maj", params.pv, f.down)                        # pv D
    k_tilde = jnp.einsum("mbk,bc,mcl->mkl", f.down.conj(), params.kq, f.down)     # D^H kq D
    lead = f.first @ params.pv.T                                                  # pv e_1
    key = jnp.einsum("mb,bc,mcl->ml", f.first.conj(), params.kq, f.down)         # e_1^H kq D
    s = jnp.einsum("mtjk,mtk->mtj", gram, jnp.einsum("mkl,mtl->mtk", k_tilde, z))
    y = jnp.einsum("maj,mtj->mta", v_tilde, s) + lead[:, None, :] * jnp.einsum("ml,mtl->mt", key, z)[..., None]
    steps = jnp.arange(1, z.shape[1] + 1, dtype=jnp.float32)                     # t - 1
    return y / steps[:, None]


def loss(params: Params, f: Features) -> jax.Array:
    """½ Σ_{t=2}^{T-1} ‖ŷ_t - x_{t+1}‖², averaged over the m sequences (real scalar)."""
    return 0.5 * jnp.sum(jnp.abs(predict(params, f) - f.target) ** 2) / f.z.shape[0]


def mse(params: Params, f: Features) -> jax.Array:
    """Mean over sequences and t = 2..T-1 of ‖ŷ_t - x_{t+1}‖² (squared norm per predicted token)."""
    return jnp.mean(jnp.sum(jnp.abs(predict(params, f) - f.target) ** 2, axis=-1))


def ratio(params: Params, f: Features) -> jax.Array:
    """mean Re(ŷ_{T-1} / x_T) over the entries with x_T ≠ 0 (sparse starts have zeros)."""
    y, target = predict(params, f)[:, -1], f.target[:, -1]
    nonzero = jnp.abs(target) > 0
    r = jnp.where(nonzero, (y / jnp.where(nonzero, target, 1.0)).real, 0.0)
    return jnp.sum(r) / jnp.sum(nonzero)


def _diagonals(params: Params) -> tuple[jax.Array, jax.Array]:
    d = params.pv.shape[0]
    return jnp.diagonal(params.kq[d:, :d]), jnp.diagonal(params.pv[:, :d])


def ab(params: Params) -> jax.Array:
    """mean_j Re kq[d+j, j] · Re pv[j, j]: the learnt one-step-GD rate."""
    a, b = _diagonals(params)
    return jnp.mean(a.real * b.real)


def balance(params: Params) -> jax.Array:
    """mean_j |kq[d+j, j]|² - |pv[j, j]|², conserved by gradient flow on the diagonal entries."""
    a, b = _diagonals(params)
    return jnp.mean(jnp.abs(a) ** 2 - jnp.abs(b) ** 2)


def off_diagonal(params: Params) -> jax.Array:
    """Largest |entry| mixing two coordinates j ≠ k in any d×d block of kq or pv."""
    d = params.pv.shape[0]
    off = 1.0 - jnp.eye(d)
    return jnp.maximum((jnp.abs(params.kq) * jnp.tile(off, (2, 2))).max(),
                       (jnp.abs(params.pv) * jnp.tile(off, (1, 2))).max())
