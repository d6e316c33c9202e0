"""Content checksums of array pytrees, for checkpoints that cannot be silently wrong.

Each leaf's digest is two position-weighted sums of its 32-bit words modulo 2**32,
``sum_i word_i * ((i * m) | 1)`` for two multipliers ``m``. The weights are odd, hence invertible
modulo 2**32, so a change confined to one element always changes the digest; wider damage goes
unnoticed with probability about 2**-64. The sums are computed on device by one jitted program over
the whole pytree: the digest is a function of the *global* array value, identical for every mesh,
sharding and process layout (a run saved on one mesh verifies when restored onto another), and in
a multi-process run every process gets the same replicated result without gathering any array.
Float leaves are also checked for non-finite values (a saved train state never holds any).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)  # two odd 32-bit constants (golden ratio, murmur3)


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as a flat uint32 vector (sub-word dtypes widened, wider ones split)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _digest(x: jax.Array) -> jax.Array:
    words = _words(x)
    index = jax.lax.iota(jnp.uint32, words.size)
    return jnp.stack([jnp.sum(words * ((index * np.uint32(m)) | np.uint32(1)), dtype=jnp.uint32)
                      for m in _MULTIPLIERS])


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


@jax.jit
def _summaries(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    if not leaves:
        return jnp.zeros((0, len(_MULTIPLIERS)), jnp.uint32), jnp.zeros((0,), jnp.bool_)
    return jnp.stack([_digest(x) for x in leaves]), jnp.stack([_finite(x) for x in leaves])


def _name(path: tuple) -> str:
    """``a/b/0`` for a key path, the same for attribute, dict and sequence keys."""
    return "/".join(str(next(getattr(k, a) for a in ("name", "key", "idx") if hasattr(k, a))) for k in path)


def summarize(tree: Any) -> tuple[dict[str, str], list[str]]:
    """(``{leaf path: hex digest}``, paths of leaves holding NaN/Inf) of a pytree of arrays.

    Collective in a multi-process run (every process must call it with its global arrays).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [_name(path) for path, _ in flat]
    digests, finite = (np.asarray(a) for a in _summaries([x for _, x in flat]))
    return ({n: "".join(f"{int(w):08x}" for w in d) for n, d in zip(names, digests)},
            [n for n, ok in zip(names, finite) if not ok])


def mismatches(tree: Any, expected: dict[str, str]) -> tuple[list[str], list[str]]:
    """(leaves whose digest differs from ``expected``, leaves holding NaN/Inf).

    Leaves without an expected digest (checkpoints written before checksums) are not compared.
    """
    digests, non_finite = summarize(tree)
    return [n for n, d in digests.items() if expected.get(n, d) != d], non_finite
