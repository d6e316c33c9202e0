"""The train state pytree: everything a resumed run needs besides the data-iterator position."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bitgen import parallel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """One training run's state; every leaf is a global jax.Array.

    step:       int32 [] — number of optimizer updates applied so far.
    rng:        typed PRNG key [] — root training key; step ``k`` uses ``fold_in(rng, k)``.
    params:     model parameters (float32).
    opt_state:  optax state (moments shaped like ``params``).
    ema_params: EMA shadow of ``params`` (decay ``optim.ema_decay``), used for eval/sampling.
    schedule:   entropy-rate sigma-schedule state (FIFO buffer + table), replicated.
    """

    step: jax.Array
    rng: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    schedule: Any

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)


def make_init_fn(
    seed: int,
    tx: optax.GradientTransformation,
    init_params: Callable[[jax.Array], Any],
    init_schedule: Callable[[], Any],
) -> Callable[[], TrainState]:
    """Zero-argument init (jit/eval_shape friendly): seed -> (param key, training key)."""

    def init() -> TrainState:
        param_key, train_key = jax.random.split(jax.random.key(seed))
        params = init_params(param_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            rng=train_key,
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params),
            schedule=init_schedule(),
        )

    return init


def state_shardings(
    mesh: Mesh, abstract_state: TrainState, param_axes: Any, tx: optax.GradientTransformation
) -> TrainState:
    """NamedShardings for every leaf: params/EMA/moments from the rules, the rest replicated.

    Replicated global arrays (not host-local ones) for step/key/schedule matter in multi-process
    runs: orbax refuses to save host-local arrays.
    """
    param_sh = parallel.tree_shardings(mesh, abstract_state.params, param_axes)
    rep = parallel.replicated(mesh)
    return TrainState(
        step=rep,
        rng=rep,
        params=param_sh,
        opt_state=parallel.optimizer_state_shardings(tx, abstract_state.opt_state, param_sh, mesh),
        ema_params=param_sh,
        schedule=jax.tree.map(lambda _: rep, abstract_state.schedule),
    )


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings (orbax restore targets)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def state_layout(
    mesh: Mesh,
    init_fn: Callable[[], TrainState],
    param_axes: Any,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, TrainState]:
    """``(shardings, abstract)`` for the state on ``mesh`` without allocating it.

    ``abstract`` holds ShapeDtypeStructs carrying the shardings: the orbax restore target.
    """
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(mesh, abstract, param_axes, tx)
    return shardings, abstract_with_shardings(abstract, shardings)


def create_train_state(init_fn: Callable[[], TrainState], shardings: TrainState) -> TrainState:
    """A fresh state, built directly in its sharded layout (no host-side full copy)."""
    return jax.jit(init_fn, out_shardings=shardings)()
