"""Optimizer, learning-rate schedule and EMA (spec §4.5).

AdamW (β=(0.9, 0.99), eps 1e-8, weight decay 0.01 on *all* parameters) after a global-norm clip,
with a linear warm-up then cosine decay to ``min_lr`` at ``total_steps``.

Reference quirk, deliberately not copied: the official trainer steps its LR scheduler *after* the
optimizer, so its first update uses the full base lr before the warm-up starts. Here update ``k``
(0-based) uses ``lr * (k+1) / warmup_steps`` during warm-up: no zero-lr step and no full-lr step
on fresh Adam moments, which is what the warm-up is for. After warm-up both agree up to this
one-step shift.
"""

from __future__ import annotations

from typing import Any

import jax
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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW with the warm-up/cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
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
