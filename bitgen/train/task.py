"""What the trainer needs to know about a task (``ExperimentConfig.task``): ``cobit`` or ``ar``.

A ``Task`` bundles parameter init and logical axes, the schedule state (CoBit's entropy-rate
sigma schedule; ``None`` for AR), the step pieces (``StepFns``) and a sampler for the periodic
text samples. Everything else — optimizer, EMA, sharding, checkpoints, preemption, logging — is
shared.

The AR baseline reuses the SDT's ``ModelConfig`` sizes (embed_dim, n_heads, n_blocks, dim_ff,
dropout, compute_dtype, seq_tokens) and takes its vocabulary from the data pipeline's codec, so a
CoBit config and its AR twin differ only in ``task``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bitgen import parallel
from bitgen.config import ExperimentConfig
from bitgen.train.state import abstract_with_shardings
from bitgen.train.step import StepFns

TASKS = ("cobit", "ar")


@dataclasses.dataclass(frozen=True)
class Task:
    """Task-specific pieces bound to one config.

    init_params:   key -> params (float32 pytree).
    param_axes:    pytree of logical-axis tuples matching the params.
    init_schedule: () -> schedule state pytree, or None when the task has none.
    step_fns:      the loss/conditioning pieces of the train step.
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    param_axes: Any
    init_schedule: Callable[[], Any]
    step_fns: StepFns


def ar_config(cfg: ExperimentConfig, vocab_size: int):
    """The ``ARConfig`` of a ``task="ar"`` experiment (sizes from ``cfg.model``, vocab from the data)."""
    from bitgen.nn.ar import ARConfig

    m = cfg.model
    return ARConfig(vocab_size=vocab_size, seq_len=m.seq_tokens, embed_dim=m.embed_dim,
                    n_heads=m.n_heads, n_blocks=m.n_blocks, dim_ff=m.dim_ff, dropout=m.dropout,
                    compute_dtype=m.compute_dtype, rope_base=m.rope_base)


def _cobit_task(cfg: ExperimentConfig) -> Task:
    from bitgen.diffusion import entropy_schedule as es
    from bitgen.diffusion.denoiser import init_params, param_logical_axes
    from bitgen.diffusion.loss import diffusion_loss

    def loss(params, bits, sigma, key):
        value, aux = diffusion_loss(params, bits, sigma, key, model_cfg=cfg.model,
                                    diffusion_cfg=cfg.diffusion, train=True)
        mse = aux["mse_per_sample"]
        return value, ({"mse": jnp.mean(mse)}, mse)

    def draw_cond(schedule, key, batch, step):
        return es.draw_training_sigma(schedule, key, batch, step, cfg.entropy, cfg.diffusion)

    def update_schedule(schedule, sigma, mse, step_after):
        # The table is rebuilt when the number of completed updates hits the cadence.
        return es.maybe_rebuild(es.push_samples(schedule, sigma, mse), step_after, cfg.entropy)

    return Task(
        name="cobit",
        init_params=lambda key: init_params(key, cfg.model),
        param_axes=param_logical_axes(cfg.model),
        init_schedule=lambda: es.init_schedule_state(cfg.entropy, cfg.diffusion),
        step_fns=StepFns(input_key="bits", loss=loss, draw_cond=draw_cond,
                         update_schedule=update_schedule,
                         cond_metrics=lambda sigma: {"sigma_median": jnp.median(sigma)}),
    )


def _ar_task(cfg: ExperimentConfig, vocab_size: int) -> Task:
    from bitgen.nn import ar

    ar_cfg = ar_config(cfg, vocab_size)

    def loss(params, ids, cond, key):
        value, aux = ar.ar_loss(params, ids, key, cfg=ar_cfg, train=True)
        return value, ({"accuracy": aux["accuracy"]}, {})

    return Task(
        name="ar",
        init_params=lambda key: ar.init_ar_params(key, ar_cfg),
        param_axes=ar.param_logical_axes(ar_cfg),
        init_schedule=lambda: None,
        step_fns=StepFns(input_key="ids", loss=loss),
    )


def build_task(cfg: ExperimentConfig, vocab_size: int | None = None) -> Task:
    """The ``Task`` for ``cfg.task``. ``vocab_size`` (the data codec's) is required for ``ar``."""
    if cfg.task == "cobit":
        return _cobit_task(cfg)
    if cfg.task == "ar":
        if vocab_size is None:
            raise ValueError("task='ar' needs the vocabulary size of the data pipeline "
                             "(PackedRows.codec.vocab_size, or a checkpoint's meta['vocab_size'])")
        return _ar_task(cfg, vocab_size)
    raise ValueError(f"task={cfg.task!r} is not one of {TASKS}")


def sample_texts(cfg: ExperimentConfig, state: Any, rows: Any, key: jax.Array, n: int) -> tuple[list[str], str]:
    """``n`` decoded samples from ``state.ema_params`` -> (texts, a short label of the method).

    CoBit: ``cfg.sampler`` (Karras grid until the entropy table exists). AR: temperature-1
    sampling continuing the first token of ``n`` validation rows.
    """
    from jax.experimental import multihost_utils

    if cfg.task == "ar":
        from bitgen.nn.ar import ar_sample

        source = rows.val_rows if len(rows.val_rows) >= n else rows.train_rows
        prompt = jnp.asarray(source[:n, :1].astype("int32"))
        ids = ar_sample(state.ema_params, key, prompt, cfg=ar_config(cfg, rows.codec.vocab_size),
                        length=cfg.model.seq_tokens)
        ids = multihost_utils.process_allgather(ids, tiled=True)
        return [rows.decode_text(row) for row in jax.device_get(ids)], "ar"

    from bitgen.sampling import build_sampler

    sampler_cfg = cfg.sampler
    table = None
    if bool(jax.device_get(state.schedule.table_ready)):
        table = jax.device_get(state.schedule.table)
    elif sampler_cfg.grid == "entropic":
        sampler_cfg = dataclasses.replace(sampler_cfg, grid="karras")  # no table learned yet
    draw = build_sampler(cfg.model, sampler_cfg, table, cfg.model.seq_bits, cfg.diffusion)
    bits = multihost_utils.process_allgather(draw(state.ema_params, key, n).bits, tiled=True)
    decoded = rows.codec.decode(jax.device_get(bits))
    texts = [rows.decode_text(ids[:length]) for ids, length in zip(decoded.ids, decoded.length)]
    return texts, sampler_cfg.grid


def abstract_params(cfg: Any, *, vocab_size: int | None = None, mesh: Mesh | None = None) -> Any:
    """Parameter ShapeDtypeStructs of ``cfg``'s model, the target for ``restore_params``.

    With ``mesh`` they carry the training layout (``parallel.LOGICAL_RULES``); without, every leaf
    sits on the first local device. ``vocab_size`` is required for ``cfg.task == "ar"`` (the
    data codec's vocabulary; a checkpoint's metadata stores it as ``meta["vocab_size"]``).

    Example (EMA weights of a run for sampling)::

        params = restore_params(run_dir / "checkpoints", abstract_params(cfg))
    """
    task = build_task(cfg, vocab_size)
    shapes = jax.eval_shape(lambda: task.init_params(jax.random.key(0)))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = parallel.tree_shardings(mesh, shapes, task.param_axes)
    return abstract_with_shardings(shapes, shardings)
