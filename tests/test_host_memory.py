"""bitgen.host_memory: a CPU program's temporary buffer is reused across calls, not faulted in anew."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from bitgen import host_memory

# A jitted program whose only temporary is a 64 MiB f32 array (exp(x), read twice; XLA does not
# recompute an exp for its second reader): 16,384 pages of 4 KiB. glibc serves blocks over 32 MiB (its largest mmap threshold)
# with mmap, so without the setting each call faults in every page again.
PROGRAM = """
import json, resource, sys
from bitgen.host_memory import keep_freed_host_memory
state = keep_freed_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((16 * 1024 * 1024,), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.exp(x) / jnp.sum(jnp.exp(x))))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 64 * 1024 * 1024
for _ in range(WARM_UP):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(CALLS):
    f(x).block_until_ready()
print(json.dumps({"state": state, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
PAGES_PER_CALL = 64 * 1024 * 1024 // 4096
WARM_UP, CALLS = 10, 20


def _run(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", f"WARM_UP, CALLS = {WARM_UP}, {CALLS}\n{PROGRAM}"], capture_output=True, text=True, check=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's")
def test_a_temporary_buffer_is_reused_instead_of_faulted_in_again():
    kept, system = _run(), _run(**{host_memory.OPT_OUT_ENV: "system"})
    assert kept["state"] == "applied" and system["state"] == "opted out"
    # glibc's default: every call faults in all 16,384 pages of its temporary again.
    assert system["faults"] > CALLS * PAGES_PER_CALL // 2
    # Kept: the freed block is reused. The heap still grows by a block now and then (a small
    # allocation lands in the free block, so the next temporary no longer fits) until it has
    # holes enough: 5 growths in 200 calls, 3 of them in the first 25, in a probe of this
    # program. Bound: fewer than a quarter of the calls fault their pages in.
    assert kept["faults"] < CALLS * PAGES_PER_CALL // 4


def test_an_accelerator_install_keeps_glibc_defaults(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.delenv(host_memory.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(host_memory, "_last", host_memory.host_malloc_state())
    assert host_memory.keep_freed_host_memory() == "accelerator"
    assert host_memory.host_malloc_state() == "accelerator"
