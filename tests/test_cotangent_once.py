"""``residual_cotangent_once``: an identity whose backward pass XLA:CPU cannot fuse away.

The tangent map writes one element back onto itself and its transpose zeroes that element of the
cotangent and adds it back, so every value (forward, tangent, cotangent) must equal the plain
function's exactly (x + 0 = x; np.array_equal treats -0.0 and +0.0 as equal): no tolerance
applies. What the function is for shows in the compiled program: an in-place
dynamic-update-slice on the cotangent sum, which XLA must therefore compute once.
"""

from __future__ import annotations

import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import bitgen.nn.block_sdt as block_sdt
import bitgen.nn.sdt as sdt
from bitgen.config import DiffusionConfig, ModelConfig
from bitgen.diffusion.denoiser import init_params, residual_logits
from bitgen.nn.layers import residual_cotangent_once

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the function acts on a single CPU device only")

SMALL = ModelConfig(patch_size=5, seq_tokens=6, embed_dim=32, n_heads=2, n_blocks=2, dim_ff=48,
                    content_dim=16, head_hidden=16, dropout=0.1)


def _residual_sum(x, w, barrier):
    """A three-block residual stream [..., n] with x's cotangent summed over every block."""
    h = barrier(x)
    for _ in range(3):
        h = h + jnp.tanh(h @ w) * 0.5
    return jnp.sum(h * h)


@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_forward_jvp_and_vjp_are_the_identity_bit_for_bit(shape, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    vector = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y, vjp = jax.jit(lambda t: jax.vjp(residual_cotangent_once, t))(x)
    (back,) = jax.jit(vjp)(vector)
    _, forward = jax.jit(lambda t, v: jax.jvp(residual_cotangent_once, (t,), (v,)))(x, vector)
    assert np.array_equal(np.asarray(y), np.asarray(x))
    assert np.array_equal(np.asarray(back), np.asarray(vector))
    assert np.array_equal(np.asarray(forward), np.asarray(vector))


def _compiled_text(barrier, x, w):
    grad = jax.jit(jax.grad(lambda x, w: _residual_sum(x, w, barrier)))
    return grad.lower(x, w).compile().as_text()


def test_the_backward_pass_updates_the_cotangent_in_place_on_one_cpu_device():
    x, w = jnp.ones((4, 8, 16)), jnp.eye(16)
    assert "dynamic-update-slice" in _compiled_text(residual_cotangent_once, x, w)
    assert "dynamic-update-slice" not in _compiled_text(lambda t: t, x, w)


def _has_barrier(x) -> bool:
    return "custom_jvp" in str(jax.make_jaxpr(residual_cotangent_once)(x))


def test_on_a_mesh_of_several_devices_it_is_the_identity():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    assert mesh.size > 1, "tests/conftest.py sets 8 fake CPU devices"
    x = jnp.ones((8, 4))
    with jax.set_mesh(mesh):
        assert not _has_barrier(x)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert _has_barrier(x)
    assert _has_barrier(x)
    assert not _has_barrier(jnp.ones(())) and not _has_barrier(jnp.ones((0, 3)))


def _sdt_loss(params, key):
    x_t = jnp.zeros((2, SMALL.seq_bits), jnp.float32)
    sigma = jnp.asarray([0.3, 2.0], jnp.float32)
    return jnp.sum(residual_logits(params, x_t, sigma, jnp.zeros_like(x_t), cfg=SMALL, key=key,
                                   train=True) ** 2)


def _block_cobit_loss(params, key):
    bits = jnp.zeros((2, SMALL.seq_bits), jnp.uint8)
    sigma = jnp.full((2, 2), 0.5, jnp.float32)
    return block_sdt.block_cobit_loss(params, bits, sigma, key, cfg=SMALL,
                                      diffusion_cfg=DiffusionConfig(), block_tokens=3,
                                      clean_sigma=0.002)[0]


@pytest.mark.parametrize("module, loss", [
    pytest.param(sdt, _sdt_loss, id="sdt"),
    # The same code path in another family: in the slow set, to keep the default suite in budget.
    pytest.param(block_sdt, _block_cobit_loss, id="block_cobit", marks=pytest.mark.slow),
])
def test_every_block_updates_its_residual_cotangent_in_place(monkeypatch, module, loss):
    """The compiled gradient (dropout on) holds one in-place update per block.

    Values are not compared bit for bit here: reading the written sum instead of re-adding it
    lets XLA order a bias-gradient reduction differently (2e-10 in one leaf when measured).
    """
    params = init_params(jax.random.key(0), SMALL)

    def blocks_updating_in_place() -> set[str]:
        grad = jax.jit(jax.grad(lambda p: loss(p, jax.random.key(2))))
        text = grad.lower(params).compile().as_text()
        return set(re.findall(r"dynamic-update-slice\(.*/(\w+_\d+)/dynamic_update_slice", text))

    assert blocks_updating_in_place() == {f"blocks_{i}" for i in range(SMALL.n_blocks)}
    monkeypatch.setattr(module, "residual_cotangent_once", lambda x: x)
    assert blocks_updating_in_place() == set()


def test_forward_mode_through_the_sdt_works():
    """Forward mode (the parity tools' jacfwd) goes through the custom JVP."""
    params = init_params(jax.random.key(0), SMALL)
    x_t = jnp.zeros((1, SMALL.seq_bits), jnp.float32)
    sigma = jnp.asarray([0.5], jnp.float32)
    row = lambda x: residual_logits(params, x, sigma, jnp.zeros_like(x), cfg=SMALL)[0]
    jacobian = jax.jit(jax.jacfwd(row))(x_t)
    reverse = jax.jit(jax.jacrev(row))(x_t)
    assert jacobian.shape == (SMALL.seq_bits, 1, SMALL.seq_bits)
    # At init every adaLN-Zero gate is closed: f_θ ≡ 0 and the logits are the matched filter's,
    # elementwise in x, so both Jacobians are exact and must agree bit for bit.
    assert np.array_equal(np.asarray(jacobian), np.asarray(reverse))
