"""``bitgen bench``: throughput against the hardware limit, sampler overhead and head memory.

One process, one run, four measurements (see docs/benchmarks.md for the formulas and a report):

1. **matmul limit**: achieved FLOP/s of an n×n·n×n matmul in the compute dtype (the peak the other
   numbers are divided by; on an accelerator it stands in for the datasheet peak, so the train
   fraction is an MFU against *achievable* peak).
2. **train step**: the real sharded ``bitgen.train.step`` (AdamW, EMA, entropy schedule,
   self-conditioning, dropout) per trunk size: step time (median after warm-up; compile reported
   separately), tokens/s, analytic model FLOPs per step and their rate as a fraction of (1),
   re-measured between the steps so both see the same machine load.
3. **sampler**: the full compiled sampler on the default grid vs ``model_calls`` × one bare
   jitted denoiser call at the same batch: the overhead ratio, samples/s and tokens/s.
4. **heads**: the SDT bit head + binary loss vs a token-softmax head + cross-entropy on the same
   trunk output, forward + backward: XLA's compiled memory (arguments + outputs + temporaries)
   and time, for several (T, V).

Timings use ``jax.block_until_ready``; everything is jitted with static shapes. Programs that are
compared are timed round-robin (``time_interleaved``) so a shared machine's drifting load hits
both sides of every ratio alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
DEFAULT_HEADS = ((128, 30522), (1024, 65536), (4096, 128000))
DEFAULT_HEAD_CHUNK_TOKENS = 128  # bit head chunk (tokens) in the head comparison; 0 = unchunked
HEAD_MEMORY_TARGET = 0.01  # bit path ≤ 1% of the token path's memory at the largest V
TRAIN_FRACTION_TARGET = 0.5  # CPU fp32 train FLOP/s ≥ 50% of the matmul limit (CoBit-S)
SAMPLER_OVERHEAD_TARGET = 1.05


# ----------------------------------------------------------------------------- machine + timing


def backend_info() -> dict[str, Any]:
    """Backend, devices, CPU model, core count, versions and the current load average."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        # e.g. --xla_cpu_multi_thread_eigen=false (single-threaded CPU runs) changes every number.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load average (None where the OS does not report one)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_dtype() -> str:
    """float32 on CPU, bfloat16 on GPU/TPU (the dtype the models would train in there)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class Timing:
    """compile_s: lower + compile; times_s: wall time of each timed call after ``warmup`` calls."""

    compile_s: float
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def to_dict(self) -> dict[str, Any]:
        return {"compile_s": round(self.compile_s, 4), "median_s": self.median_s,
                "times_s": [round(t, 5) for t in self.times_s]}


@dataclasses.dataclass
class Program:
    """One jitted function to time: ``args`` for the first call, ``calls`` timed calls per round,
    ``feed_back(out) -> args`` for inputs that are donated (e.g. a train state)."""

    jitted: Any
    args: Sequence[Any]
    calls: int = 1
    feed_back: Callable[[Any], Sequence[Any]] | None = None


def time_interleaved(programs: dict[str, Program], *, rounds: int,
                     warmup: int = 1) -> dict[str, Timing]:
    """Compile every program, then time them round-robin for ``rounds`` rounds.

    On a shared machine the available compute drifts; interleaving exposes every program to the
    same conditions, so ratios between them stay meaningful even when absolute times do not.
    """
    compiled, args, times, compile_s = {}, {}, {}, {}
    for name, prog in programs.items():
        start = time.perf_counter()
        compiled[name] = prog.jitted.lower(*prog.args).compile()
        compile_s[name] = time.perf_counter() - start
        args[name], times[name] = prog.args, []
    for round_index in range(warmup + rounds):
        for name, prog in programs.items():
            for _ in range(prog.calls):
                start = time.perf_counter()
                out = jax.block_until_ready(compiled[name](*args[name]))
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
                if prog.feed_back is not None:
                    args[name] = prog.feed_back(out)
    return {name: Timing(compile_s[name], tuple(times[name])) for name in programs}


def compiled_memory(jitted, args: Sequence[Any]) -> dict[str, int]:
    """Bytes XLA assigns to the compiled program: arguments, outputs, temporaries and their sum.

    ``peak_bytes`` = argument + output + temp − alias (donated buffers counted once).
    """
    analysis = jitted.lower(*args).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError(f"backend {jax.default_backend()!r} reports no compiled memory analysis")
    out = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
    }
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                         - out["alias_bytes"])
    return out


# ----------------------------------------------------------------------------- 1. matmul limit


def matmul_program(size: int, dtype: str, chain: int = 1) -> Program:
    """``chain`` dependent [n, n]·[n, n] matmuls (2n³ FLOPs each) in one jitted program.

    A chain as long as the program it is compared with samples the machine over the same span of
    time: on a shared CPU a short matmul right after a long step gets a different share of the
    cores than the step did.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    # Scaled so repeated products keep unit-size entries (no overflow to inf in a long chain).
    b = (jax.random.normal(key_b, (size, size), jnp.float32) / math.sqrt(size)).astype(dtype)

    @jax.jit
    def chained(a, b):
        return jax.lax.fori_loop(0, chain, lambda _, x: jnp.matmul(x, b), a)

    return Program(chained, (a, b))


def matmul_limit(size: int, dtype: str, *, chain: int = 16, repeats: int = 5) -> dict[str, Any]:
    """Achieved FLOP/s of a chain of ``chain`` n×n matmuls in ``dtype``, median of ``repeats``.

    A chain (not one call) keeps per-call costs (dispatch, waking the thread pool, allocating the
    output) out of the limit.
    """
    timing = time_interleaved({"matmul": matmul_program(size, dtype, chain)},
                              rounds=repeats)["matmul"]
    flops = chain * 2.0 * size**3
    return {"size": size, "chain": chain, "dtype": dtype, "flops": flops, **timing.to_dict(),
            "flops_per_s": flops / timing.median_s}


# ----------------------------------------------------------------------------- analytic FLOPs


def _kernel_rows(path: tuple[str, ...], cfg: ModelConfig) -> int:
    """How many rows per sequence a Dense kernel is applied to in one SDT forward.

    adaLN modulations and the σ embedding act once per sequence; the shared Linear(1→C) acts on
    both input channels of every bit; the head's input adapter and mixer act per bit; everything
    else (patch projection, trunk, un-patch, the head's patch adapter) acts per token.
    """
    module = path[-2]
    if any(part.startswith("adaln") for part in path) or module.startswith("time_"):
        return 1
    if module == "cont_input_proj":
        return 2 * cfg.seq_bits
    if path[0] == "head" and module in ("input_adapter", "mixer_0", "mixer_3"):
        return cfg.seq_bits
    return cfg.seq_tokens


def forward_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs of one SDT forward for ONE sequence, counting matmuls only (2 FLOPs per MAC).

    ``dense``: Σ over Dense kernels of 2·fan_in·fan_out·rows (rows per ``_kernel_rows``);
    ``attention``: 2 batched matmuls per block (QKᵀ and PV), 2·2·T²·E per block.
    Elementwise work (norms, SiLU, softmax, RoPE, the matched filter) is not counted, as in the
    usual MFU convention.
    """
    from bitgen.diffusion.denoiser import param_shapes

    dense_flops = 0.0
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        if path[-1] != "kernel":
            continue
        fan_in, fan_out = leaf.shape
        dense_flops += 2.0 * fan_in * fan_out * _kernel_rows(path, cfg)
    attention = cfg.n_blocks * 4.0 * cfg.seq_tokens**2 * cfg.embed_dim
    return {"dense": dense_flops, "attention": attention, "total": dense_flops + attention}


def train_step_flops(cfg: ModelConfig, batch: int, *, self_conditioning: bool) -> float:
    """Model FLOPs of one training step: (3 + sc)·batch·forward_flops.

    Forward + backward = 3× the forward (the backward computes gradients w.r.t. both activations
    and weights: 2× forward). With self-conditioning the step runs one extra gradient-free forward
    over the whole batch (rows not selected are masked afterwards, but still computed). Remat
    recomputation and the optimizer update are not model FLOPs and are not counted.
    """
    passes = 3 + (1 if self_conditioning else 0)
    return passes * batch * forward_flops(cfg)["total"]


# ----------------------------------------------------------------------------- 2. train step


def trunk_config(name: str, *, dtype: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named trunk (``TRUNKS``) in compute dtype ``dtype``."""
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; choose from {sorted(TRUNKS)}")
    embed, heads, blocks, ff = TRUNKS[name]
    cfg = ModelConfig(embed_dim=embed, n_heads=heads, n_blocks=blocks, dim_ff=ff, compute_dtype=dtype)
    return dataclasses.replace(cfg, **overrides)


def _random_bits(key: jax.Array, batch: int, seq_bits: int) -> jax.Array:
    return jax.random.bernoulli(key, 0.5, (batch, seq_bits)).astype(jnp.uint8)


def bench_train_step(model_cfg: ModelConfig, batch: int, *, repeats: int, matmul_size: int,
                     name: str = "") -> dict[str, Any]:
    """Time the real jitted, sharded, donated train step of ``bitgen.train`` at ``batch``.

    The matmul limit is re-measured between steps (``time_interleaved``) with a chain of matmuls
    of the step's FLOP count, so the step's achieved FLOP/s is divided by a limit taken under the
    same machine load over a similar span of time.
    """
    from bitgen import parallel
    from bitgen.diffusion.denoiser import count_params
    from bitgen.train.optim import make_optimizer
    from bitgen.train.state import create_train_state, make_init_fn, state_layout
    from bitgen.train.step import jit_train_step, make_train_step
    from bitgen.train.task import build_task

    cfg = validate(ExperimentConfig(model=model_cfg, data=DataConfig(batch_size=batch),
                                    train=TrainConfig(steps=1_000_000)))
    mesh = parallel.make_mesh(cfg.mesh)
    task = build_task(cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    init_fn = make_init_fn(cfg.train.seed, tx, task.init_params, task.init_schedule)
    shardings, _ = state_layout(mesh, init_fn, task.param_axes, tx)
    state = create_train_state(init_fn, shardings)
    step = jit_train_step(make_train_step(cfg, tx, task.step_fns, mesh), mesh, shardings)
    bits = np.asarray(_random_bits(jax.random.key(1), batch, model_cfg.seq_bits))
    data = parallel.global_batch({task.step_fns.input_key: bits}, mesh, batch)

    flops = train_step_flops(model_cfg, batch,
                             self_conditioning=cfg.diffusion.self_condition_prob > 0)
    chain = max(1, round(flops / (2.0 * matmul_size**3)))
    timings = time_interleaved(
        {"step": Program(step, (state, data), feed_back=lambda out: (out[0], data)),
         "matmul": matmul_program(matmul_size, model_cfg.compute_dtype, chain)}, rounds=repeats)
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


# ----------------------------------------------------------------------------- 3. sampler


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


# ----------------------------------------------------------------------------- 4. heads


class BitHead(nn.Module):
    """The SDT's output path after the trunk: un-patch projection + per-bit head -> f_θ [B, S].

    Same submodules and shapes as ``bitgen.nn.sdt.SDT`` steps 6-7.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, content: jax.Array, t_emb: jax.Array) -> jax.Array:
        from bitgen.nn.layers import dense
        from bitgen.nn.sdt import OptimalSkipMLPHead, apply_head

        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        batch, seq_bits = content.shape[:2]
        unpatched = dense(cfg.patch_size * cfg.content_dim, ("embed", "content"),
                          name="unpatch_proj_content", dtype=dtype)(tokens)
        x_rec = unpatched.reshape(batch, seq_bits, cfg.content_dim)
        logits = apply_head(OptimalSkipMLPHead(cfg, name="head"), x_rec, content, tokens, t_emb)
        return logits[..., 0].astype(jnp.float32)


def bits_per_token(vocab: int) -> int:
    """P = ceil(log2 V): the bit-code width of a V-token vocabulary."""
    return max(1, math.ceil(math.log2(vocab)))


def head_chunk(chunk_tokens: int, seq_tokens: int) -> int:
    """The bit head's chunk at T = ``seq_tokens``: the largest divisor of T that is ≤ the request
    (gcd, so powers of two stay powers of two); 0 (off) stays 0."""
    return math.gcd(chunk_tokens, seq_tokens) if chunk_tokens else 0


def head_programs(trunk_cfg: ModelConfig, seq_tokens: int, vocab: int, batch: int, *,
                  chunk_tokens: int = DEFAULT_HEAD_CHUNK_TOKENS):
    """``(cfg, {"bit": (loss_fn, args), ["bit_unchunked": ...,] "token": (loss_fn, args)})``.

    All paths read the same trunk output. Each ``loss_fn(head_params, trunk_out, ...)`` returns a
    scalar loss; trunk_out is [B, T, E]. The bit path (un-patch + SDT head + matched filter +
    binary loss, P = ceil(log2 V)) also takes the per-bit content features [B, S, 2C] the SDT
    computes before its trunk, the noisy bits, σ and the target bits; its head runs in
    rematerialised chunks of ``head_chunk(chunk_tokens, T)`` tokens (``cfg.head_chunk_tokens``),
    and when that is on ``bit_unchunked`` is the same path without chunking. The token path
    (Dense E->V + softmax cross-entropy) takes token labels.
    """
    from bitgen.diffusion.denoiser import combine_logits
    from bitgen.diffusion.loss import loss_from_logits

    p = bits_per_token(vocab)
    cfg = dataclasses.replace(trunk_cfg, patch_size=p, seq_tokens=seq_tokens,
                              head_chunk_tokens=head_chunk(chunk_tokens, seq_tokens))
    e, s, dtype = cfg.embed_dim, cfg.seq_bits, jnp.dtype(cfg.compute_dtype)
    keys = jax.random.split(jax.random.key(3), 6)
    tokens = jax.random.normal(keys[0], (batch, seq_tokens, e), dtype)
    t_emb = jax.random.normal(keys[1], (batch, e), dtype)
    content = jax.random.normal(keys[2], (batch, s, 2 * cfg.content_dim), dtype)
    bits = _random_bits(keys[3], batch, s)
    sigma = jnp.full((batch,), 0.5, jnp.float32)
    x_t = bits.astype(jnp.float32) + sigma[:, None] * jax.random.normal(keys[4], (batch, s))
    labels = jax.random.randint(keys[5], (batch, seq_tokens), 0, vocab)

    bit_params = nn.unbox(jax.jit(BitHead(cfg).init)(jax.random.key(4), tokens, content,
                                                     t_emb)["params"])

    def bit_loss_fn(bit_cfg: ModelConfig) -> Callable:
        def bit_loss(params, tokens, content, t_emb, x_t, sigma, bits):
            f_theta = BitHead(bit_cfg).apply({"params": params}, tokens, content, t_emb)
            logits = combine_logits(f_theta, x_t, sigma, cfg=bit_cfg)
            return loss_from_logits(logits, bits, sigma, loss_type="binary_sm", weighting="edm",
                                    sigma_data=0.5)[0]
        return bit_loss

    token_head = nn.Dense(vocab, dtype=dtype, param_dtype=jnp.float32)
    token_params = jax.jit(token_head.init)(jax.random.key(5), tokens)["params"]

    def token_loss(params, tokens, labels):
        logits = token_head.apply({"params": params}, tokens).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    bit_args = (bit_params, tokens, content, t_emb, x_t, sigma, bits)
    programs = {"bit": (bit_loss_fn(cfg), bit_args)}
    if cfg.head_chunk_tokens:
        unchunked = dataclasses.replace(cfg, head_chunk_tokens=0)
        programs["bit_unchunked"] = (bit_loss_fn(unchunked), bit_args)
    programs["token"] = (token_loss, (token_params, tokens, labels))
    return cfg, programs


def head_train_fn(loss_fn: Callable) -> Callable:
    """Jitted loss and gradients w.r.t. the head parameters and the trunk output (what a training
    step needs from a head)."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))


def head_flops(cfg: ModelConfig, vocab: int, batch: int) -> dict[str, float]:
    """Forward+backward matmul FLOPs (3× forward) of each head; used to budget timing runs."""
    t, e, p = cfg.seq_tokens, cfg.embed_dim, cfg.patch_size
    c, h = cfg.content_dim, cfg.head_hidden
    bit_per_seq = 2 * t * e * p * (c + h) + 2 * cfg.seq_bits * (3 * c * h + h * h + h)
    # Chunking recomputes the head's forward in the backward pass: extra work, not model FLOPs.
    return {"bit": 3.0 * batch * bit_per_seq, "bit_unchunked": 3.0 * batch * bit_per_seq,
            "token": 3.0 * batch * 2 * t * e * vocab}


def bench_heads(trunk_cfg: ModelConfig, shapes: Sequence[tuple[int, int]], batch: int, *,
                repeats: int, peak_flops: float | None, time_budget_s: float,
                chunk_tokens: int = DEFAULT_HEAD_CHUNK_TOKENS) -> list[dict]:
    """Per (T, V): compiled memory of the forward loss (``forward_memory``) and of loss + gradients
    (``memory``), always; time of loss + gradients when its estimate fits ``time_budget_s``.

    ``memory_ratio`` judges the bit path as configured (chunked head when ``chunk_tokens`` > 0);
    ``unchunked_memory_ratio`` is the same path with the whole-sequence head, for comparison.
    """
    rows = []
    for seq_tokens, vocab in shapes:
        cfg, programs = head_programs(trunk_cfg, seq_tokens, vocab, batch, chunk_tokens=chunk_tokens)
        flops = head_flops(cfg, vocab, batch)
        row: dict[str, Any] = {"seq_tokens": seq_tokens, "vocab": vocab,
                               "bits_per_token": cfg.patch_size, "batch": batch,
                               "compute_dtype": cfg.compute_dtype,
                               "head_chunk_tokens": cfg.head_chunk_tokens}
        for label, (loss_fn, args) in programs.items():
            train_fn = head_train_fn(loss_fn)
            entry: dict[str, Any] = {"memory": compiled_memory(train_fn, args),
                                     "forward_memory": compiled_memory(jax.jit(loss_fn), args),
                                     "flops": flops[label]}
            estimate = None if peak_flops is None else flops[label] / peak_flops
            if estimate is not None and estimate * (repeats + 1) > time_budget_s:
                entry["time"] = f"skipped: ~{estimate:.1f}s per call exceeds --head-time-budget"
            else:
                entry["time"] = time_interleaved({label: Program(train_fn, args)},
                                                 rounds=repeats)[label].to_dict()
            row[label] = entry
        row["memory_ratio"] = row["bit"]["memory"]["peak_bytes"] / row["token"]["memory"]["peak_bytes"]
        row["forward_memory_ratio"] = (row["bit"]["forward_memory"]["peak_bytes"]
                                       / row["token"]["forward_memory"]["peak_bytes"])
        unchunked = row.get("bit_unchunked", row["bit"])
        row["unchunked_memory_ratio"] = (unchunked["memory"]["peak_bytes"]
                                         / row["token"]["memory"]["peak_bytes"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report


def run_bench(*, dtype: str, matmul_size: int, matmul_chain: int, matmul_repeats: int,
              train: Sequence[tuple[str, int]], train_repeats: int,
              sampler: Sequence[tuple[str, int]], sampler_repeats: int, nfe: int,
              heads: Sequence[tuple[int, int]], head_trunk: str, head_batch: int,
              head_repeats: int, head_time_budget_s: float,
              head_chunk_tokens: int = DEFAULT_HEAD_CHUNK_TOKENS, seq_tokens: int = 128,
              patch_size: int = 15, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every requested measurement in this process and return the report dict.

    Train and sampler runs use T=``seq_tokens`` tokens of P=``patch_size`` bits; the head
    comparison sets T and P from each (T, V).
    """
    trunk = functools.partial(trunk_config, dtype=dtype, seq_tokens=seq_tokens, patch_size=patch_size)
    report: dict[str, Any] = {"machine": backend_info(), "load_average_before": load_average(),
                              "compute_dtype": dtype}
    log(f"backend {report['machine']['backend']} ({report['machine']['device_kind']}), "
        f"dtype {dtype}, load {report['load_average_before']}")
    if matmul_size < 1:
        raise ValueError(f"matmul_size={matmul_size} must be >= 1")
    report["matmul"] = matmul_limit(matmul_size, dtype, chain=matmul_chain, repeats=matmul_repeats)
    peak = report["matmul"]["flops_per_s"]
    log(f"matmul {matmul_size}: {peak / 1e9:.1f} GFLOP/s")
    report["train"] = []
    for name, batch in train:
        row = bench_train_step(trunk(name), batch, repeats=train_repeats,
                               matmul_size=matmul_size, name=name)
        report["train"].append(row)
        log(f"train {name} b={batch}: {row['median_s']:.3f}s/step, {row['tokens_per_s']:.0f} tok/s, "
            f"{row['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{row['fraction_of_matmul_limit']:.1%} of the matmul limit")
    report["sampler"] = []
    for name, batch in sampler:
        row = bench_sampler(trunk(name), batch, nfe=nfe,
                            repeats=sampler_repeats, name=name)
        report["sampler"].append(row)
        log(f"sampler {name} b={batch}: overhead {row['overhead_ratio']:.3f} "
            f"(vs a loop of bare calls {row['loop_overhead_ratio']:.3f})")
    report["heads"] = []
    if heads:
        report["heads"] = bench_heads(trunk_config(head_trunk, dtype=dtype), heads, head_batch,
                                      repeats=head_repeats, peak_flops=peak,
                                      time_budget_s=head_time_budget_s,
                                      chunk_tokens=head_chunk_tokens)
        report["head_trunk"] = head_trunk
        log("heads: " + ", ".join(f"V={r['vocab']} ratio {r['memory_ratio']:.4f} "
                                  f"(unchunked {r['unchunked_memory_ratio']:.4f})"
                                  for r in report["heads"]))
    report["matmul_limit_flops_per_s"] = peak
    report["load_average_after"] = load_average()
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Which issue targets the report meets (None where not measured)."""
    out: dict[str, Any] = {}
    trunk_rows = [r for r in report.get("train", []) if r["trunk"] == "cobit-s"]
    if trunk_rows:
        frac = trunk_rows[0]["fraction_of_matmul_limit"]
        out["train_fraction_cobit_s"] = {"value": frac, "target": TRAIN_FRACTION_TARGET,
                                         "met": frac >= TRAIN_FRACTION_TARGET}
    if report.get("sampler"):
        for key in ("overhead_ratio", "loop_overhead_ratio"):
            worst = max(r[key] for r in report["sampler"])
            out[f"sampler_{key}"] = {"value": worst, "target": SAMPLER_OVERHEAD_TARGET,
                                     "met": worst <= SAMPLER_OVERHEAD_TARGET}
    if report.get("heads"):
        largest = max(report["heads"], key=lambda r: r["vocab"])
        out["head_memory_ratio"] = {"value": largest["memory_ratio"], "vocab": largest["vocab"],
                                    "head_chunk_tokens": largest["head_chunk_tokens"],
                                    "target": HEAD_MEMORY_TARGET,
                                    "met": largest["memory_ratio"] <= HEAD_MEMORY_TARGET}
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return ["", *lines, *("| " + " | ".join(row) + " |" for row in rows)]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ms(entry: Any) -> str:
    return f"{entry['median_s'] * 1e3:.1f} ms" if isinstance(entry, dict) else "skipped"


def format_table(report: dict[str, Any]) -> str:
    """A short Markdown summary of the report."""
    m = report["machine"]
    lines = [
        (f"machine: {m['cpu_model']} ({m['cpu_cores']} cores), backend {m['backend']} "
        f"({m['device_kind']} x{m['device_count']}), jax {m['jax_version']}, "
        f"dtype {report['compute_dtype']}"),
        (f"load average before {report['load_average_before']}, after "
        f"{report['load_average_after']}"),
        (f"matmul limit: {report['matmul_limit_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(n={report['matmul']['size']}, chain of {report['matmul']['chain']})"),
    ]
    if report.get("train"):
        lines += _table(
            ["trunk", "batch", "params", "compile s", "step s", "tokens/s", "GFLOP/step",
             "GFLOP/s", "matmul GFLOP/s", "of limit"],
            [[r["trunk"], str(r["batch"]), f"{r['params'] / 1e6:.1f}M", f"{r['compile_s']:.1f}",
              f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_step'] / 1e9:.1f}",
              f"{r['achieved_flops_per_s'] / 1e9:.1f}", f"{r['matmul_limit_flops_per_s'] / 1e9:.1f}",
              f"{r['fraction_of_matmul_limit']:.1%}"] for r in report["train"]])
    if report.get("sampler"):
        lines += _table(
            ["trunk", "batch", "calls", "sampler s", "bare call ms", "overhead", "bare loop s",
             "overhead vs loop", "samples/s", "tokens/s"],
            [[r["trunk"], str(r["batch"]), str(r["model_calls"]), f"{r['sampler']['median_s']:.2f}",
              f"{r['bare_call']['median_s'] * 1e3:.2f}", f"{r['overhead_ratio']:.3f}",
              f"{r['bare_loop']['median_s']:.2f}", f"{r['loop_overhead_ratio']:.3f}",
              f"{r['samples_per_s']:.3f}", f"{r['tokens_per_s']:.1f}"] for r in report["sampler"]])
    if report.get("heads"):
        lines += _table(
            ["T", "V", "P", "chunk", "bit mem", "token mem", "ratio", "fwd-only ratio",
             "unchunked bit mem", "unchunked ratio", "bit time", "unchunked bit time",
             "token time"],
            [[str(r["seq_tokens"]), str(r["vocab"]), str(r["bits_per_token"]),
              str(r["head_chunk_tokens"] or "off"),
              _mib(r["bit"]["memory"]["peak_bytes"]), _mib(r["token"]["memory"]["peak_bytes"]),
              f"{r['memory_ratio']:.2%}", f"{r['forward_memory_ratio']:.2%}",
              _mib(r.get("bit_unchunked", r["bit"])["memory"]["peak_bytes"]),
              f"{r['unchunked_memory_ratio']:.2%}", _ms(r["bit"]["time"]),
              _ms(r.get("bit_unchunked", r["bit"])["time"]), _ms(r["token"]["time"])]
             for r in report["heads"]])
    if report.get("targets"):
        lines.append("")
        lines += [f"target {name}: {t['value']:.4g} vs {t['target']} -> "
                  f"{'met' if t['met'] else 'NOT met'}" for name, t in report["targets"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _trunk_batch(spec: str) -> tuple[str, int]:
    name, _, batch = spec.partition(":")
    if name not in TRUNKS or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected TRUNK:BATCH with TRUNK in {sorted(TRUNKS)}, e.g. cobit-s:4")
    return name, int(batch)


def _tokens_vocab(spec: str) -> tuple[int, int]:
    t, _, v = spec.partition(":")
    if not (t.isdigit() and v.isdigit()) or int(t) < 1 or int(v) < 2:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected T:V (tokens:vocab), e.g. 1024:65536")
    return int(t), int(v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench_report.json"),
                        help="JSON report path (default: %(default)s)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="n of the n×n matmul limit (0 = 2048 on CPU, 8192 elsewhere)")
    parser.add_argument("--matmul-chain", type=int, default=16,
                        help="dependent matmuls per timed call of the limit (default: %(default)s)")
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--train", type=_trunk_batch, nargs="*", default=None,
                        help="TRUNK:BATCH train-step runs (default: cobit-s:4 small:16 on CPU, "
                             "cobit-s:64 small:128 elsewhere)")
    parser.add_argument("--train-repeats", type=int, default=5)
    parser.add_argument("--sampler", type=_trunk_batch, nargs="*", default=None,
                        help="TRUNK:BATCH sampler runs (default: small:2 on CPU, "
                             "cobit-s:64 small:64 elsewhere)")
    parser.add_argument("--sampler-repeats", type=int, default=3)
    parser.add_argument("--seq-tokens", type=int, default=128,
                        help="T of the train and sampler runs (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, default=15,
                        help="P (bits per token) of the train and sampler runs (default: %(default)s)")
    parser.add_argument("--nfe", type=int, default=256,
                        help="sampler NFE label (256 = 255 grid points, the LM1B headline)")
    parser.add_argument("--heads", type=_tokens_vocab, nargs="*", default=list(DEFAULT_HEADS),
                        help="T:V head comparisons (default: "
                             + " ".join(f"{t}:{v}" for t, v in DEFAULT_HEADS) + ")")
    parser.add_argument("--head-trunk", choices=sorted(TRUNKS), default="cobit-s",
                        help="trunk width E of the head comparison")
    parser.add_argument("--head-batch", type=int, default=1)
    parser.add_argument("--head-chunk-tokens", type=int, default=DEFAULT_HEAD_CHUNK_TOKENS,
                        help="bit head chunk in tokens (the gcd with each T is used; 0 = "
                             "unchunked only; default: %(default)s)")
    parser.add_argument("--head-repeats", type=int, default=3)
    parser.add_argument("--head-time-budget", type=float, default=30.0,
                        help="skip timing a head when its estimated run time exceeds this (s)")


def run(args: argparse.Namespace) -> int:
    accelerator = jax.default_backend() != "cpu"
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    matmul_size = args.matmul_size or (8192 if accelerator else 2048)
    train = args.train if args.train is not None else (
        [("cobit-s", 64), ("small", 128)] if accelerator else [("cobit-s", 4), ("small", 16)])
    sampler = args.sampler if args.sampler is not None else (
        [("cobit-s", 64), ("small", 64)] if accelerator else [("small", 2)])
    report = run_bench(dtype=dtype, matmul_size=matmul_size, matmul_chain=args.matmul_chain,
                       matmul_repeats=args.matmul_repeats,
                       train=train, train_repeats=args.train_repeats, sampler=sampler,
                       sampler_repeats=args.sampler_repeats, nfe=args.nfe, heads=args.heads,
                       head_trunk=args.head_trunk, head_batch=args.head_batch,
                       head_repeats=args.head_repeats, head_time_budget_s=args.head_time_budget,
                       head_chunk_tokens=args.head_chunk_tokens,
                       seq_tokens=args.seq_tokens, patch_size=args.patch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"report written to {args.out}")
    return 0
