"""Full-batch gradient descent (discretised gradient flow) on a fixed set of sequences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tools.mesa import model
from tools.mesa.model import Features, Params


def descent(params: Params, f: Features) -> tuple[jax.Array, Params]:
    """(loss, -(∂L/∂Re W + i ∂L/∂Im W)): the steepest-descent direction over Re W and Im W.

    jax.grad of a real loss w.r.t. a complex leaf returns ∂L/∂Re W - i ∂L/∂Im W (the conjugate of
    that direction), hence the conj.
    """
    value, grads = jax.value_and_grad(model.loss)(params, f)
    return value, jax.tree.map(lambda g: -jnp.conj(g), grads)


@functools.partial(jax.jit, static_argnames=("steps", "masked"))
def run(params: Params, f: Features, lr: float, steps: int, masked: bool = False):
    """`steps` steps W <- W + lr · descent; masked zeroes every entry off the diagonal pattern.

    Returns (final params, trace): trace maps ab, balance, off_diagonal, loss to (steps,) arrays,
    each logged at the params a step starts from.
    """
    mask = model.diagonal_mask(params.pv.shape[0])

    def step(p, _):
        value, direction = descent(p, f)
        log = {"ab": model.ab(p), "balance": model.balance(p),
               "off_diagonal": model.off_diagonal(p), "loss": value}
        p = jax.tree.map(lambda w, g: w + lr * g, p, direction)
        if masked:
            p = jax.tree.map(lambda w, k: w * k, p, mask)
        return p, log

    return jax.lax.scan(step, params, None, length=steps)
