"""The pure, jitted training step.

``train_step(state, batch) -> (state, metrics)``:
1. key_k = fold_in(state.rng, step); sigma [B] drawn from the entropy-schedule state.
2. loss/grads over ``optim.grad_accum`` micro-batches (a lax.scan summing grads: the same update as
   one large batch; metrics are per global step).
3. clip + AdamW update, EMA update.
4. (sigma, per-sample MSE) pushed into the schedule buffer; table rebuilt on its cadence.
5. A non-finite loss or gradient leaves the state unchanged and sets ``metrics['finite']=False``,
   so a NaN never reaches a checkpoint; the loop stops with an error naming the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from bitgen import parallel
from bitgen.config import ExperimentConfig
from bitgen.train.optim import ema_update, learning_rate_schedule
from bitgen.train.state import TrainState

# (params, bits [b, S] uint8, sigma [b], key) -> (scalar loss, aux with 'mse_per_sample' [b])
LossFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The model-specific pieces of a step (bound to a config by ``cobit_step_fns``).

    loss:            see ``LossFn``.
    draw_sigma:      (schedule, key, batch_size, step) -> sigma [batch_size].
    update_schedule: (schedule, sigma [B], mse [B], step_after) -> schedule.
    """

    loss: LossFn
    draw_sigma: Callable[[Any, jax.Array, int, jax.Array], jax.Array]
    update_schedule: Callable[[Any, jax.Array, jax.Array, jax.Array], Any]


def _split_micro(x: jax.Array, accum: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...] with micro-batch j = rows j, j+accum, ...

    Strided (not contiguous) micro-batches keep every device's rows local when the batch is
    sharded contiguously over devices: no resharding per micro-batch.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of ``_split_micro``."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def make_train_step(
    cfg: ExperimentConfig,
    tx: optax.GradientTransformation,
    fns: StepFns,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The unjitted pure step for ``cfg`` (see ``jit_train_step`` for the sharded version)."""
    accum = cfg.optim.grad_accum
    lr_at = learning_rate_schedule(cfg.optim, cfg.train.steps)
    micro_sharding = (
        None if mesh is None
        else NamedSharding(mesh, jax.sharding.PartitionSpec(None, *parallel.logical_to_spec(("batch",))))
    )

    def constrain(x):
        return x if micro_sharding is None else jax.lax.with_sharding_constraint(x, micro_sharding)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        bits = batch["bits"]
        global_batch = bits.shape[0]
        if global_batch % accum:
            raise ValueError(
                f"batch of {global_batch} rows is not divisible by optim.grad_accum={accum}"
            )
        step_key = jax.random.fold_in(state.rng, state.step)
        sigma_key, loss_key = jax.random.split(step_key)
        sigma = fns.draw_sigma(state.schedule, sigma_key, global_batch, state.step)
        grad_fn = jax.value_and_grad(fns.loss, has_aux=True)

        def micro_step(grad_sum, inputs):
            index, bits_mb, sigma_mb = inputs
            (loss, aux), grads = grad_fn(state.params, bits_mb, sigma_mb, jax.random.fold_in(loss_key, index))
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return grad_sum, (loss, aux["mse_per_sample"])

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grad_sum, (losses, mse) = jax.lax.scan(
            micro_step,
            zeros,
            (jnp.arange(accum), constrain(_split_micro(bits, accum)), constrain(_split_micro(sigma, accum))),
        )
        # Equal-size micro-batches: the mean of micro-batch means is the full-batch mean.
        grads = jax.tree.map(lambda g: g / accum, grad_sum)
        loss = jnp.mean(losses)
        mse = _merge_micro(mse)
        grad_norm = optax.tree.norm(grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_step = state.step + 1
        updated = state.replace(
            step=new_step,
            params=params,
            opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, cfg.optim.ema_decay),
            schedule=fns.update_schedule(state.schedule, sigma, mse, new_step),
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Keep the previous state on a non-finite step. The key never changes, so it is carried
        # over as is (select on typed keys is not needed).
        kept = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            updated.replace(rng=None),
            state.replace(rng=None),
        ).replace(rng=state.rng)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_at(state.step),
            "mse": jnp.mean(mse),
            "sigma_median": jnp.median(sigma),
            "finite": finite,
        }
        return kept, metrics

    return train_step


def jit_train_step(
    step_fn: Callable,
    mesh: Mesh,
    state_shardings: TrainState,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """jit with explicit shardings; the input state is donated (updated in place)."""
    batch_sh = {"bits": parallel.batch_sharding(mesh)}
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def cobit_step_fns(cfg: ExperimentConfig) -> StepFns:
    """The CoBit pieces: binary score-matching loss and the entropy-rate sigma schedule."""
    from bitgen.diffusion import entropy_schedule as es
    from bitgen.diffusion.loss import diffusion_loss

    def loss(params, bits, sigma, key):
        return diffusion_loss(params, bits, sigma, key, model_cfg=cfg.model,
                              diffusion_cfg=cfg.diffusion, train=True)

    def draw_sigma(schedule, key, batch, step):
        return es.draw_training_sigma(schedule, key, batch, step, cfg.entropy, cfg.diffusion)

    def update_schedule(schedule, sigma, mse, step_after):
        # The table is rebuilt when the number of completed updates hits the cadence.
        return es.maybe_rebuild(es.push_samples(schedule, sigma, mse), step_after, cfg.entropy)

    return StepFns(loss=loss, draw_sigma=draw_sigma, update_schedule=update_schedule)
