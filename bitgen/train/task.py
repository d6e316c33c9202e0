"""The training pieces of a config's model family, and the abstract parameters of its model.

``build_task(cfg, vocab_size)`` asks the family registry (``bitgen.families``) for the
``Task``: parameter init and logical axes, schedule state and train-step pieces. Everything else
(optimizer, EMA, sharding, checkpoints, preemption, logging) is shared by every family.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from bitgen import parallel
from bitgen.config import ExperimentConfig
from bitgen.families import family_of
from bitgen.families.base import Task
from bitgen.train.state import abstract_with_shardings


def build_task(cfg: ExperimentConfig, vocab_size: int | None = None) -> Task:
    """The ``Task`` of ``cfg``'s family. ``vocab_size`` is the data codec's V; a family whose
    parameters depend on it (AR: one softmax row per id) refuses None."""
    return family_of(cfg).task(cfg, vocab_size)


def abstract_params(cfg: Any, *, vocab_size: int | None = None, mesh: Mesh | None = None) -> Any:
    """Parameter ShapeDtypeStructs of ``cfg``'s model, the target for ``restore_params``.

    With ``mesh`` they carry the training layout (``parallel.LOGICAL_RULES``); without, every leaf
    sits on the first local device. ``vocab_size``: the data codec's V (a checkpoint's metadata
    stores it as ``meta["vocab_size"]``).

    Example (EMA weights of a run for sampling)::

        params = restore_params(run_dir / "checkpoints", abstract_params(cfg, vocab_size=V))
    """
    task = build_task(cfg, vocab_size)
    shapes = jax.eval_shape(lambda: task.init_params(jax.random.key(0)))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = parallel.tree_shardings(mesh, shapes, task.param_axes)
    return abstract_with_shardings(shapes, shardings)
