"""Host memory reuse for CPU runs: keep freed memory instead of returning it to the OS.

XLA:CPU allocates each call's temporary buffer afresh (for CoBit-S's train step at batch 4 that is
1.14 GB). glibc serves such a block with ``mmap`` and returns it with ``munmap``, so every step
faults in all its pages again: 278,000 page faults per step, about 10% of the step on 2 cores.
With one malloc arena, no ``mmap`` for large blocks and no trimming, glibc keeps the freed block
and the next step reuses it. The price: freed memory stays with the process until it exits, and
the heap can grow past the peak when small allocations split a free block (see
docs/benchmarks.md for the measured resident memory).

``keep_freed_host_memory()`` applies this on CPU-only JAX installs (or ``JAX_PLATFORMS=cpu``) with
glibc; ``BITGEN_HOST_MALLOC=system`` keeps glibc's defaults. The ``bitgen`` commands that run
programs step after step call it before JAX starts; library users call it before their first JAX
computation (afterwards it does nothing and says "too late").
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
OPT_OUT_ENV = "BITGEN_HOST_MALLOC"
_last = "not requested"  # what the last keep_freed_host_memory() call did (see host_malloc_state)


def _accelerator_plugins() -> list[str]:
    """Names of the JAX accelerator plugins installed (entry points, ``jax_plugins.*``, libtpu)."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # noqa: PLC0415 (namespace package, present only with a plugin)

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return names


def _jax_started() -> bool:
    """Whether JAX has created its backends (and with them the threads that allocate)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415 (only when jax is already imported)

    return xla_bridge.backends_are_initialized()


def _runs_on_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_plugins()


def keep_freed_host_memory() -> str:
    """Tell glibc to keep freed memory for reuse when JAX runs on the CPU; return what was done.

    Returns "applied", or why not: "opted out", "accelerator", "too late" (JAX already started
    its backends: their threads keep the arenas they have), "not glibc" (another C library,
    macOS, Windows), "refused" (``mallopt`` returned 0). Safe to call more than once. A
    preloaded allocator (jemalloc, tcmalloc) makes the call a no-op that still says "applied".
    """
    global _last
    _last = _apply()
    return _last


def host_malloc_state() -> str:
    """What the last ``keep_freed_host_memory()`` did ("not requested" if never called)."""
    return _last


def _apply() -> str:
    if os.environ.get(OPT_OUT_ENV, "").lower() == "system":
        return "opted out"
    if not _runs_on_cpu():
        return "accelerator"
    if _jax_started():
        return "too late"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its C library among them
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and others lack it)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) for param, value in (
        (_M_ARENA_MAX, 1),  # worker threads' arenas would mmap large blocks regardless
        (_M_MMAP_MAX, 0),  # large blocks from the heap, not mmap
        (_M_TRIM_THRESHOLD, -1),  # never return the heap's top to the OS
    ))
    return "applied" if ok else "refused"
