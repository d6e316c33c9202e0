"""bitgen.host_memory: a CPU program's temporary buffer is reused across calls, not faulted in anew."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys

import jax
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
WARM_UP, CALLS = 20, 20


def _run(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", f"WARM_UP, CALLS = {WARM_UP}, {CALLS}\n{PROGRAM}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's")
def test_a_temporary_buffer_is_reused_instead_of_faulted_in_again():
    kept, system = _run(), _run(**{host_memory.OPT_OUT_ENV: "system"})
    assert kept["state"] == "applied" and system["state"] == "opted out"
    # glibc's default: every call faults in all 16,384 pages of its temporary again.
    assert system["faults"] > CALLS * PAGES_PER_CALL * 9 // 10
    # Kept: the freed block is reused, but the heap still grows by a block now and then (a small
    # allocation splits the free block, so the next temporary no longer fits): 0-4 growths per
    # 20 calls in 15 probes of this program, 5 in 200 calls in a longer one. Bound: fewer than
    # half the calls fault their pages in.
    assert kept["faults"] < CALLS * PAGES_PER_CALL // 2


@pytest.fixture
def restore_state(monkeypatch):
    monkeypatch.delenv(host_memory.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(host_memory, "_last", host_memory.host_malloc_state())


def test_jax_platforms_naming_an_accelerator_first_keeps_glibc_defaults(monkeypatch, restore_state):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert host_memory.keep_freed_host_memory() == "accelerator"
    assert host_memory.host_malloc_state() == "accelerator"


@pytest.mark.parametrize("plugin", ["entry point", "libtpu"])
def test_an_installed_accelerator_plugin_keeps_glibc_defaults(plugin, monkeypatch, restore_state):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    cuda = importlib.metadata.EntryPoint("cuda", "jax_cuda12_plugin", "jax_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [cuda] if plugin == "entry point" and group == "jax_plugins" else [])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if plugin == "libtpu" and name == "libtpu" else real_find_spec(name))
    assert host_memory.keep_freed_host_memory() == "accelerator"


def test_after_jax_started_it_is_too_late(monkeypatch, restore_state):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    jax.devices()  # the backends (and their threads) exist from here on
    assert host_memory.keep_freed_host_memory() == "too late"


def test_other_systems_are_left_alone(monkeypatch, restore_state):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(host_memory, "_jax_started", lambda: False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.keep_freed_host_memory() == "not glibc"
