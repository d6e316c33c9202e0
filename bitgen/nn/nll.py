"""The next-token scoring rule every causal evaluator shares (cobit-spec §6.1).

It lives with the models (not in ``bitgen.eval``) because the AR and GPT-2 models build their
``sequence_nll`` on it and models must not import evaluation code; ``bitgen.eval.metrics``
re-exports it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def windowed_sequence_nll(
    logits_fn: Callable[[jax.Array], jax.Array], ids: jax.Array, mask: jax.Array, *, window: int
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token NLL per row over non-overlapping windows (spec §6.1).

    Args:
      logits_fn: ids [N, W] -> logits [N, W, V] of a causal model (position t predicts t+1).
      ids: [B, T] int token ids, right-padded.
      mask: [B, T] bool, True on real tokens.
      window: context length W of the model; T need not be a multiple of it.
    Returns:
      (nll_sum [B] float32 nats, n_scored [B] int32). Token t is scored when it is real and not the
      first token of its window (``t mod W != 0``): the reference scores each window independently.
    """
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"ids and mask must both be [B, T]; got {ids.shape} and {mask.shape}")
    batch, length = ids.shape
    n_windows = -(-length // window)
    pad = n_windows * window - length
    ids = jnp.pad(ids, ((0, 0), (0, pad)))
    mask = jnp.pad(mask.astype(bool), ((0, 0), (0, pad)))
    ids_w = ids.reshape(batch * n_windows, window)
    logits = logits_fn(ids_w)[:, :-1].astype(jnp.float32)
    # logsumexp form: no second [N, W, V] log-prob array next to the logits (GPT-2 Large, V = 50257).
    token_nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids_w[:, 1:])
    scored = mask.reshape(batch * n_windows, window)[:, 1:]
    nll = jnp.where(scored, token_nll, 0.0).reshape(batch, -1).sum(axis=1)
    n_scored = scored.reshape(batch, -1).sum(axis=1).astype(jnp.int32)
    return nll, n_scored
