"""Machine description and timing: interleaved timing of jitted programs, XLA's compiled memory,
and the matmul limit every throughput is divided by."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bitgen.host_memory import host_malloc_state


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
        # bitgen.host_memory: "applied" = freed host memory kept for reuse (~10% of a CPU step).
        "host_malloc": host_malloc_state(),
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

