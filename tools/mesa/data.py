"""Noise-free rotating sequences x_{t+1} = W x_t with W = diag(e^{iθ_1}, ..., e^{iθ_d}), θ_j ~ U[0, 2π)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

STARTS = ("gaussian", "sparse", "ones")


class Sequences(NamedTuple):
    """m sequences, each fixed by its first token x1: (m, d) real and its angles theta: (m, d) rad."""

    x1: jax.Array
    theta: jax.Array


def first_token(key: jax.Array, start: str, m: int, d: int, scale: float = 1.0) -> jax.Array:
    """(m, d) real first tokens x_1.

    gaussian: N(0, scale² I); sparse: ±scale · e_J, J uniform, random sign; ones: all ones
    (scale unused; this start breaks the paper's symmetry assumption).
    """
    if start == "gaussian":
        return scale * jax.random.normal(key, (m, d))
    if start == "sparse":
        kj, ks = jax.random.split(key)
        hot = jax.nn.one_hot(jax.random.randint(kj, (m,), 0, d), d)
        return scale * jax.random.rademacher(ks, (m, 1), hot.dtype) * hot
    if start == "ones":
        return jnp.ones((m, d))
    raise ValueError(f"unknown start {start!r}; expected one of {STARTS}")


def sample(key: jax.Array, start: str, m: int, d: int, scale: float = 1.0) -> Sequences:
    """m sequences with a fresh W each (float32 angles and first tokens)."""
    k_theta, k_x = jax.random.split(key)
    theta = jax.random.uniform(k_theta, (m, d), jnp.float32, 0.0, 2 * jnp.pi)
    return Sequences(first_token(k_x, start, m, d, scale).astype(jnp.float32), theta)


def powers(seq: Sequences, T: int) -> jax.Array:
    """(m, T, d) complex64 z_t = (λ_1^{t-1}, ..., λ_d^{t-1}), taken as e^{i(t-1)θ} (no repeated products)."""
    steps = jnp.arange(T, dtype=jnp.float32)[None, :, None]
    return jnp.exp(1j * steps * seq.theta[:, None, :]).astype(jnp.complex64)


def tokens(seq: Sequences, T: int) -> jax.Array:
    """(m, T, d) complex64 sequences x_t = W^{t-1} x_1."""
    return seq.x1[:, None, :] * powers(seq, T)
