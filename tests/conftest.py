"""Test setup: 8 fake CPU devices (set before JAX initialises) and the shared fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# The official CoBit golden vectors, vendored from ../shared/reference/cobit (tests/golden/README.md).
REFERENCE_DIR = REPO_ROOT / "tests" / "golden" / "cobit"


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per usable CPU, at most 8 and at most one per 6 GiB of memory (a
    worker is a JAX process keeping its compiled programs: 5.1 GB peak RSS in a full default run on
    2 workers). xdist's own count is of physical cores, 1 on a 2-vCPU VM.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still wins (None defers to xdist)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cpus, 8, int(memory_gib // 6)))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The vendored official CoBit golden vectors (present in every checkout)."""
    return REFERENCE_DIR
