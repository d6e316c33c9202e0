"""The compiled train program of one (config, mesh, vocabulary): optimizer, state layout and the
jitted, sharded, donated step. Training, ``bitgen bench`` and tests build it here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from bitgen.config import ExperimentConfig
from bitgen.train.optim import make_optimizer
from bitgen.train.state import TrainState, create_train_state, make_init_fn, state_layout
from bitgen.train.step import StepFns, jit_train_step, make_train_step
from bitgen.train.task import build_task

# (state, {input_key: [B, ...]}) -> (state, metrics: dict of scalars); the input state is donated.
StepFn = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything a run needs to create, restore and advance its ``TrainState`` on one mesh.

    tx:        the optimizer (clip + AdamW with the warm-up/cosine schedule).
    init_fn:   () -> fresh TrainState (seeded by ``train.seed``; jit/eval_shape friendly).
    shardings: NamedSharding per state leaf.
    abstract:  ShapeDtypeStructs of the state carrying ``shardings`` (the orbax restore target).
    step_fn:   the jitted train step (see ``StepFn``).
    input_key: the batch entry the step reads (``bits`` for CoBit, ``ids`` for AR).
    optional_inputs: further batch entries the step reads when the data has them (CoBit:
        ``cond_mask``, the known bits of conditional training).
    """

    tx: optax.GradientTransformation
    init_fn: Callable[[], TrainState]
    shardings: TrainState
    abstract: TrainState
    step_fn: StepFn
    input_key: str
    optional_inputs: tuple[str, ...] = ()

    def batch_of(self, local: dict[str, Any]) -> dict[str, Any]:
        """The entries of a data batch this step reads."""
        return {k: local[k] for k in (self.input_key, *self.optional_inputs) if k in local}

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its sharded layout."""
        return create_train_state(self.init_fn, self.shardings)


def assemble_train_program(
    cfg: ExperimentConfig,
    mesh: Mesh,
    *,
    init_params: Callable[[jax.Array], Any],
    param_axes: Any,
    init_schedule: Callable[[], Any],
    step_fns: StepFns,
) -> TrainProgram:
    """The program for explicit task pieces (see ``bitgen.train.task.Task``): the one place the
    optimizer, init, layout and step are put together. Not cached; ``build_train_program`` is."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    init_fn = make_init_fn(cfg.train.seed, tx, init_params, init_schedule)
    shardings, abstract = state_layout(mesh, init_fn, param_axes, tx)
    step_fn = jit_train_step(make_train_step(cfg, tx, step_fns, mesh), mesh, shardings)
    return TrainProgram(tx, init_fn, shardings, abstract, step_fn, step_fns.input_key,
                        step_fns.optional_inputs)


@functools.lru_cache(maxsize=4)
def build_train_program(cfg: ExperimentConfig, mesh: Mesh,
                        vocab_size: int | None = None) -> TrainProgram:
    """The program of ``cfg.task`` (``bitgen.train.task.build_task``) on ``mesh``.

    ``vocab_size`` (the data codec's) is required for ``task="ar"``. Cached per (config, mesh,
    vocabulary), so a second run in the same process (a resume, a test, a demo of several configs)
    reuses the jitted init/step and their compilations.
    """
    task = build_task(cfg, vocab_size)
    return assemble_train_program(cfg, mesh, init_params=task.init_params,
                                  param_axes=task.param_axes, init_schedule=task.init_schedule,
                                  step_fns=task.step_fns)
