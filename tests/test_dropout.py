"""bitgen's Dropout equals flax.linen.Dropout bit for bit (same rng stream, same mask, same output)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.nn.layers import Dropout, keep_mask

# A few shapes (each new shape compiles the eager ops again), covering ranks 1-3 and odd sizes.
shapes = st.sampled_from([(1,), (7,), (40,), (3, 5), (2, 3, 4), (9, 1, 13)])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), keep=st.floats(0.0, 1.0), shape=shapes)
def test_keep_mask_is_jax_bernoulli(seed, keep, shape):
    key = jax.random.key(seed)
    expected = jax.random.bernoulli(key, keep, shape)
    np.testing.assert_array_equal(np.asarray(keep_mask(key, keep, shape)), np.asarray(expected))


def test_keep_mask_accepts_raw_keys():
    raw = jax.random.PRNGKey(7)  # uint32 [2]
    np.testing.assert_array_equal(np.asarray(keep_mask(raw, 0.9, (5, 6))),
                                  np.asarray(jax.random.bernoulli(raw, 0.9, (5, 6))))


def test_keep_mask_falls_back_for_other_prng_implementations():
    key = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.5, (8, 9))),
                                  np.asarray(jax.random.bernoulli(key, 0.5, (8, 9))))


class _Twice(nn.Module):
    """Two dropouts in a row, as a block applies them: exercises the per-call rng stream."""

    dropout_cls: type
    rate: float

    @nn.compact
    def __call__(self, x):
        return self.dropout_cls(self.rate, deterministic=False)(
            self.dropout_cls(self.rate, deterministic=False)(x) * 2.0)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_dropout_equals_flax_dropout(rate):
    x = jax.random.normal(jax.random.key(0), (3, 16, 24))
    rngs = {"dropout": jax.random.key(11)}
    ours = _Twice(Dropout, rate).apply({}, x, rngs=rngs)
    flax = _Twice(nn.Dropout, rate).apply({}, x, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax))
    grads = [jax.grad(lambda v, cls=cls: jnp.sum(_Twice(cls, rate).apply({}, v, rngs=rngs) ** 2))(x)
             for cls in (Dropout, nn.Dropout)]
    np.testing.assert_array_equal(np.asarray(grads[0]), np.asarray(grads[1]))
