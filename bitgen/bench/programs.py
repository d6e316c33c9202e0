"""Train-step and sampler benchmarks on named trunk sizes."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.bench.flops import forward_flops, train_step_flops
from bitgen.bench.timing import Program, matmul_program, time_interleaved
from bitgen.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    SamplerConfig,
    TrainConfig,
    validate,
)

# Trunk shapes by name: (embed_dim, n_heads, n_blocks, dim_ff). T=128, P=15 unless overridden.
TRUNKS: dict[str, tuple[int, int, int, int]] = {
    "cobit-s": (768, 12, 12, 3072),
    "small": (256, 4, 4, 1024),
    "tiny": (32, 2, 1, 64),
}


def trunk_config(name: str, *, dtype: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named trunk (``TRUNKS``) in compute dtype ``dtype``."""
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; choose from {sorted(TRUNKS)}")
    embed, heads, blocks, ff = TRUNKS[name]
    cfg = ModelConfig(embed_dim=embed, n_heads=heads, n_blocks=blocks, dim_ff=ff, compute_dtype=dtype)
    return dataclasses.replace(cfg, **overrides)


def random_bits(key: jax.Array, batch: int, seq_bits: int) -> jax.Array:
    """Uniform random bits [batch, seq_bits] uint8."""
    return jax.random.bernoulli(key, 0.5, (batch, seq_bits)).astype(jnp.uint8)


def train_step_program(model_cfg: ModelConfig, batch: int) -> tuple[Program, float]:
    """The real jitted, sharded, donated train step of ``bitgen.train`` at ``batch`` as a timing
    ``Program`` (fresh state, uniform random bits), and its model FLOPs per step
    (``train_step_flops``, self-conditioning pass counted when the config has one)."""
    from bitgen import parallel
    from bitgen.train.program import build_train_program

    cfg = validate(ExperimentConfig(model=model_cfg, data=DataConfig(batch_size=batch),
                                    train=TrainConfig(steps=1_000_000)))
    mesh = parallel.make_mesh(cfg.mesh)
    program = build_train_program(cfg, mesh)
    state, step = program.init_state(), program.step_fn
    bits = np.asarray(random_bits(jax.random.key(1), batch, model_cfg.seq_bits))
    data = parallel.global_batch({program.input_key: bits}, mesh, batch)
    flops = train_step_flops(model_cfg, batch,
                             self_conditioning=cfg.diffusion.self_condition_prob > 0)
    return Program(step, (state, data), feed_back=lambda out: (out[0], data)), flops


def bench_train_step(model_cfg: ModelConfig, batch: int, *, repeats: int, matmul_size: int,
                     name: str = "") -> dict[str, Any]:
    """Time the real jitted, sharded, donated train step of ``bitgen.train`` at ``batch``.

    The matmul limit is re-measured between steps (``time_interleaved``) with a chain of matmuls
    of the step's FLOP count, so the step's achieved FLOP/s is divided by a limit taken under the
    same machine load over a similar span of time.
    """
    from bitgen.diffusion.denoiser import count_params

    step, flops = train_step_program(model_cfg, batch)
    chain = max(1, round(flops / (2.0 * matmul_size**3)))
    timings = time_interleaved(
        {"step": step, "matmul": matmul_program(matmul_size, model_cfg.compute_dtype, chain)},
        rounds=repeats)
    timing = timings["step"]
    limit = chain * 2.0 * matmul_size**3 / timings["matmul"].median_s
    tokens = batch * model_cfg.seq_tokens
    achieved = flops / timing.median_s
    return {
        "trunk": name, "batch": batch, "seq_tokens": model_cfg.seq_tokens,
        "patch_size": model_cfg.patch_size, "compute_dtype": model_cfg.compute_dtype,
        "params": count_params(model_cfg), "tokens_per_step": tokens,
        "forward_flops_per_seq": forward_flops(model_cfg), "flops_per_step": flops,
        **timing.to_dict(), "tokens_per_s": tokens / timing.median_s,
        "achieved_flops_per_s": achieved, "matmul_chain": chain, "matmul_limit_flops_per_s": limit,
        "fraction_of_matmul_limit": achieved / limit,
    }


def bench_sampler(model_cfg: ModelConfig, batch: int, *, nfe: int = 256, repeats: int = 3,
                  call_repeats: int = 5, name: str = "") -> dict[str, Any]:
    """Full compiled sampler (LM1B entropic grid, DDIM + churn γ=0.2, SC carry) vs bare denoising.

    ``overhead_ratio`` = sampler time / (``model_calls`` × one bare jitted ``denoise`` call) at the
    same batch and shapes (``call_repeats`` bare calls per round, rounds interleaved with the
    sampler runs). A single bare call also pays dispatch and per-call work XLA hoists out
    of a loop, so ``loop_overhead_ratio`` compares against one compiled ``lax.scan`` chaining the
    same number of bare calls: what remains is the sampler's own arithmetic and noise draws.
    """
    from bitgen.diffusion.denoiser import denoise, init_params
    from bitgen.diffusion.entropy_schedule import load_entropy_table
    from bitgen.sampling import model_calls
    from bitgen.sampling import build_sampler

    sampler_cfg = SamplerConfig(nfe=nfe, batch_size=batch)
    params = init_params(jax.random.key(0), model_cfg)
    draw = build_sampler(model_cfg, sampler_cfg, load_entropy_table("lm1b"), model_cfg.seq_bits)
    calls = model_calls(len(draw.grid), sampler_cfg.name, sampler_cfg.sc_mode)
    sampler = jax.jit(lambda p, key: draw(p, key, batch).bits)
    x = 0.5 + jax.random.normal(jax.random.key(2), (batch, model_cfg.seq_bits))
    x0_hat = jnp.full_like(x, 0.5)
    bare_fn = functools.partial(denoise, cfg=model_cfg)
    sigma = jnp.full((batch,), 1.0, jnp.float32)

    @jax.jit
    def bare_loop(params, x, sigmas):
        # Each call's logits feed the next call's inputs (x and, one step later, x0_hat, as the
        # sampler's SC carry does), so no call and no part of one can be elided or hoisted.
        def body(carry, sigma):
            x, x0 = carry
            return (bare_fn(params, x, jnp.broadcast_to(sigma, (batch,)), x0), x), None
        return jax.lax.scan(body, (x, x0_hat), sigmas)[0][0]

    timings = time_interleaved({
        "sampler": Program(sampler, (params, jax.random.key(1))),
        "bare_call": Program(jax.jit(bare_fn), (params, x, sigma, x0_hat), calls=call_repeats),
        "bare_loop": Program(bare_loop, (params, x, jnp.asarray(draw.grid[:calls], jnp.float32))),
    }, rounds=repeats)
    sample_timing, call_timing, loop_timing = (timings[k] for k in ("sampler", "bare_call", "bare_loop"))
    bare_total = calls * call_timing.median_s
    return {
        "trunk": name, "batch": batch, "compute_dtype": model_cfg.compute_dtype,
        "grid_points": len(draw.grid), "model_calls": calls,
        "sampler": sample_timing.to_dict(), "bare_call": call_timing.to_dict(),
        "bare_loop": loop_timing.to_dict(), "bare_total_s": bare_total,
        "overhead_ratio": sample_timing.median_s / bare_total,
        "loop_overhead_ratio": sample_timing.median_s / loop_timing.median_s,
        "samples_per_s": batch / sample_timing.median_s,
        "tokens_per_s": batch * model_cfg.seq_tokens / sample_timing.median_s,
    }

