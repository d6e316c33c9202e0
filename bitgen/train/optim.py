"""Optimizer, learning-rate schedule and EMA (spec §4.5).

AdamW (β=(0.9, 0.99), eps 1e-8, weight decay 0.01 on *all* parameters) after a global-norm clip,
with a linear warm-up then cosine decay to ``min_lr`` at ``total_steps``.

The clip is optax's rule (unchanged below ``grad_clip``, else scaled to norm ``grad_clip``) written
as one multiplication by a scalar, as the reference's ``clip_grad_norm_`` does, so that XLA fuses
it into both Adam moment updates (optax's division is not copied into two consumers, and the
clipped gradients went through memory once more); the train step also passes the norm it already
has. docs/benchmarks.md, "RoPE tables and the clip", has the measurements.

Reference quirk, deliberately not copied: the official trainer steps its LR scheduler *after* the
optimizer, so its first update uses the full base lr before the warm-up starts. Here update ``k``
(0-based) uses ``lr * (k+1) / warmup_steps`` during warm-up: no zero-lr step and no full-lr step
on fresh Adam moments, which is what the warm-up is for. After warm-up both agree up to this
one-step shift.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bitgen.config import ConfigError, OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr for the update whose optax count is ``k`` (0-based): warm-up then cosine to min_lr."""
    if total_steps <= cfg.warmup_steps:
        raise ConfigError(
            f"train.steps={total_steps} must exceed optim.warmup_steps={cfg.warmup_steps}"
        )
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=total_steps,
        end_value=cfg.min_lr,
    )
    # Shift by one so update 1 uses lr/warmup (not 0) and the last update lands on min_lr.
    return lambda count: base(count + 1)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """g · min(1, max_norm / ‖g‖) over the whole tree (‖g‖ < max_norm: g unchanged, bit for bit).

    ``update(..., grad_norm=n)`` uses n as ‖g‖ instead of computing it: in a chain every member
    receives the same n, so it must be the norm of the updates as they reach the clip (the clip
    first). Its state is optax's ``EmptyState`` (as ``optax.clip_by_global_norm``'s, so
    checkpoints are unchanged).
    """

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm(grad_clip) -> AdamW with the warm-up/cosine schedule; ``update`` takes
    ``grad_norm=`` (the gradients' global norm, when the caller has it)."""
    return optax.chain(
        clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        ),
    )


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    """Shadow <- decay * shadow + (1 - decay) * params (no bias correction, as the reference)."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
