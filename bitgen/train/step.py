"""The pure, jitted training step, generic over tasks (CoBit diffusion, AR baseline).

``train_step(state, batch) -> (state, metrics)``:
1. key_k = fold_in(state.rng, step); per-row conditioning (CoBit: sigma [B]) drawn from the
   schedule state.
2. loss/grads over ``optim.grad_accum`` micro-batches (more than one: a lax.scan summing grads, the
   same update as one large batch; metrics are per global step).
3. clip (by the global norm computed once here) + AdamW update, EMA update.
4. The per-row outputs (CoBit: (sigma, per-sample MSE)) update the schedule state.
5. A non-finite loss or gradient leaves the state unchanged (on CPU 3-4 run in a ``lax.cond``
   branch, elsewhere a select keeps the old state) and sets ``metrics['finite']=False``, so a
   NaN never reaches a checkpoint; the loop stops with an error naming the step.
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

# (params, inputs [b, ...], cond (pytree of [b] arrays), key, **optional inputs [b, ...]) ->
#     (scalar loss, (metrics: dict of scalars, per_row: pytree of [b] arrays))
LossFn = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


def _no_cond(schedule: Any, key: jax.Array, batch: int, step: jax.Array) -> dict:
    return {}


def _keep_schedule(schedule: Any, cond: Any, per_row: Any, step_after: jax.Array) -> Any:
    return schedule


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The task-specific pieces of a step (see ``bitgen.train.task``).

    input_key:       the batch entry the loss reads (``bits`` for CoBit, ``ids`` for AR).
    loss:            see ``LossFn``; ``metrics`` are averaged over micro-batches.
    optional_inputs: batch entries [B, ...] passed to the loss as keyword arguments when the
                     batch carries them (CoBit: ``cond_mask``); absent entries are not passed.
    draw_cond:       (schedule, key, batch_size, step) -> per-row conditioning (pytree of [B]).
    update_schedule: (schedule, cond, per_row [B] pytree, step_after) -> schedule.
    cond_metrics:    cond -> dict of scalar metrics logged each step.
    """

    input_key: str
    loss: LossFn
    optional_inputs: tuple[str, ...] = ()
    draw_cond: Callable[[Any, jax.Array, int, jax.Array], Any] = _no_cond
    update_schedule: Callable[[Any, Any, Any, jax.Array], Any] = _keep_schedule
    cond_metrics: Callable[[Any], dict[str, jax.Array]] = lambda cond: {}


def _split_micro(x: jax.Array, accum: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...] with micro-batch j = rows j, j+accum, ...

    Strided (not contiguous) micro-batches keep every device's rows local when the batch is
    sharded contiguously over devices: no resharding per micro-batch.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of ``_split_micro``."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def update_if_finite(finite: jax.Array, update: Callable[[TrainState], TrainState],
                     state: TrainState, *, branch: bool) -> TrainState:
    """``update(state)`` if ``finite`` else ``state``, as a ``lax.cond`` branch or a select.

    The branch lets XLA:CPU update the donated buffers in place, reading each once; a select reads
    every buffer twice and copies the optimizer state (docs/benchmarks.md). On accelerators a
    branch would make the host wait for the predicate before it launches the update.
    """
    if branch:
        return jax.lax.cond(finite, update, lambda state: state, state)
    updated = update(state)
    # The key never changes, so it is carried over as is (select on typed keys is not needed).
    return jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        updated.replace(rng=None),
        state.replace(rng=None),
    ).replace(rng=state.rng)


def make_train_step(
    cfg: ExperimentConfig,
    tx: optax.GradientTransformation,
    fns: StepFns,
    mesh: Mesh | None = None,
    guard_branch: bool | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The unjitted pure step for ``cfg`` (see ``jit_train_step`` for the sharded version).

    guard_branch: keep the state on a non-finite step with a branch (see ``update_if_finite``);
    default: when the mesh's devices (else the default backend) are CPUs.
    """
    accum = cfg.optim.grad_accum
    tx = optax.with_extra_args_support(tx)  # a plain transformation ignores grad_norm=
    if guard_branch is None:
        platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
        guard_branch = platform == "cpu"
    lr_at = learning_rate_schedule(cfg.optim, cfg.train.steps)
    micro_sharding = (
        None if mesh is None
        else NamedSharding(mesh, jax.sharding.PartitionSpec(None, *parallel.logical_to_spec(("batch",))))
    )

    def constrain(x):
        return x if micro_sharding is None else jax.lax.with_sharding_constraint(x, micro_sharding)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        inputs = batch[fns.input_key]
        global_batch = inputs.shape[0]
        if global_batch % accum:
            raise ValueError(
                f"batch of {global_batch} rows is not divisible by optim.grad_accum={accum}"
            )
        step_key = jax.random.fold_in(state.rng, state.step)
        cond_key, loss_key = jax.random.split(step_key)
        cond = fns.draw_cond(state.schedule, cond_key, global_batch, state.step)
        grad_fn = jax.value_and_grad(fns.loss, has_aux=True)

        extras = {k: batch[k] for k in fns.optional_inputs if k in batch}

        if accum == 1:
            # What the scan below computes for one micro-batch, without the loop and without a
            # zero-filled gradient buffer the size of the parameters.
            (loss, (micro_metrics, per_row)), grads = grad_fn(
                state.params, inputs, cond, jax.random.fold_in(loss_key, 0), **extras)
        else:
            def micro_step(grad_sum, xs):
                index, inputs_mb, cond_mb, extras_mb = xs
                (loss, aux), grads = grad_fn(state.params, inputs_mb, cond_mb,
                                             jax.random.fold_in(loss_key, index), **extras_mb)
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return grad_sum, (loss, aux)

            def split(x):
                return constrain(_split_micro(x, accum))

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grad_sum, (losses, (micro_metrics, per_row)) = jax.lax.scan(
                micro_step, zeros, (jnp.arange(accum), split(inputs), jax.tree.map(split, cond),
                                    jax.tree.map(split, extras)),
            )
            # Equal-size micro-batches: the mean of micro-batch means is the full-batch mean.
            grads = jax.tree.map(lambda g: g / accum, grad_sum)
            loss = jnp.mean(losses)
            per_row = jax.tree.map(_merge_micro, per_row)
        micro_metrics = jax.tree.map(jnp.mean, micro_metrics)  # over micro-batches (a no-op for one)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state: TrainState) -> TrainState:
            updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                           grad_norm=grad_norm)
            params = optax.apply_updates(state.params, updates)
            new_step = state.step + 1
            return state.replace(
                step=new_step,
                params=params,
                opt_state=opt_state,
                ema_params=ema_update(state.ema_params, params, cfg.optim.ema_decay),
                schedule=fns.update_schedule(state.schedule, cond, per_row, new_step),
            )

        kept = update_if_finite(finite, update, state, branch=guard_branch)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_at(state.step),
            **micro_metrics,
            **fns.cond_metrics(cond),
            "finite": finite,
        }
        return kept, metrics

    return train_step


def jit_train_step(
    step_fn: Callable,
    mesh: Mesh,
    state_shardings: TrainState,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """jit with explicit shardings; the input state is donated (updated in place).

    Every batch entry is split on its leading (row) dimension over the data-parallel axes.
    """
    return jax.jit(
        parallel.with_activation_mesh(step_fn, mesh),  # the model's activation constraints act
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
