"""Tiny stand-ins with the real interfaces, so training infrastructure tests run in seconds.

A 2-layer MLP "denoiser" over S bits with logical axes like the real model, a noisy-MSE loss with
the ``LossFn`` signature, and a minimal FIFO sigma "schedule".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitgen.config import (
    DataConfig,
    ExperimentConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)
from bitgen.train.program import TrainProgram, assemble_train_program
from bitgen.train.step import StepFns

SEQ_BITS = 24
EMBED = 16
HIDDEN = 16
BUFFER = 64


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w_in": 0.3 * jax.random.normal(k1, (SEQ_BITS, EMBED)),
        "w_mid": 0.3 * jax.random.normal(k2, (EMBED, HIDDEN)),
        "b_mid": jnp.zeros((HIDDEN,)),
        "w_out": 0.3 * jax.random.normal(k3, (HIDDEN, SEQ_BITS)),
    }


PARAM_AXES = {
    "w_in": ("bits", "embed"),
    "w_mid": ("embed", "mlp"),
    "b_mid": ("mlp",),
    "w_out": ("mlp", "bits"),
}


def loss(params, bits, sigma, key, *, noisy: bool = True):
    x0 = bits.astype(jnp.float32)
    noise = jax.random.normal(key, x0.shape) if noisy else jnp.zeros_like(x0)
    x_t = x0 + sigma[:, None] * noise
    h = jnp.tanh(jnp.tanh((x_t - 0.5) @ params["w_in"]) @ params["w_mid"] + params["b_mid"])
    d = jax.nn.sigmoid(h @ params["w_out"])
    mse = jnp.mean((d - x0) ** 2, axis=-1)
    weight = 1.0 / sigma**2 + 4.0
    return jnp.mean(weight * mse), ({"mse": jnp.mean(mse)}, mse)


def init_schedule() -> dict[str, jax.Array]:
    return {"buffer": jnp.zeros((BUFFER, 2)), "count": jnp.zeros((), jnp.int32)}


def draw_sigma(schedule, key, batch, step):
    return jnp.exp(-1.2 + 1.2 * jax.random.normal(key, (batch,)))


def update_schedule(schedule, sigma, mse, step):
    rows = jnp.stack([sigma, mse], axis=-1)
    start = schedule["count"] % (BUFFER - rows.shape[0] + 1)
    return {
        "buffer": jax.lax.dynamic_update_slice(schedule["buffer"], rows, (start, 0)),
        "count": schedule["count"] + rows.shape[0],
    }


def step_fns(noisy: bool = True) -> StepFns:
    return StepFns(
        input_key="bits",
        loss=lambda p, b, s, k: loss(p, b, s, k, noisy=noisy),
        draw_cond=draw_sigma,
        update_schedule=update_schedule,
    )


def program(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, fns: StepFns | None = None) -> TrainProgram:
    """The compiled train program of the stand-in task (``fns`` replaces its step pieces)."""
    return assemble_train_program(cfg, mesh, init_params=init_params, param_axes=PARAM_AXES,
                                  init_schedule=init_schedule, step_fns=fns or step_fns())


def config(*, steps: int = 20, grad_accum: int = 1, batch: int = 16, mesh: MeshConfig = MeshConfig()) -> ExperimentConfig:
    return ExperimentConfig(
        name="standin",
        data=DataConfig(batch_size=batch),
        optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_accum=grad_accum, ema_decay=0.9),
        mesh=mesh,
        train=TrainConfig(steps=steps, seed=0),
    )


def batch_bits(step: int, batch: int = 16) -> jax.Array:
    """A deterministic batch for step ``step`` (host numpy-free)."""
    return jax.random.bernoulli(jax.random.key(1000 + step), 0.5, (batch, SEQ_BITS)).astype(jnp.uint8)
