"""Test setup: 8 fake CPU devices (set before JAX initialises), the ``-n auto`` worker count and
the shared fixtures."""

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


def cgroup_limits(root: Path = Path("/sys/fs/cgroup")) -> tuple[float | None, int | None]:
    """(CPUs, bytes of memory) this process's cgroup (v2, else v1) allows; None where unlimited.
    A container's CPU quota and memory limit are invisible to ``sched_getaffinity`` and sysconf."""
    def fields(name: str) -> list[str]:
        try:
            return (root / name).read_text().split()
        except OSError:
            return []

    cpus = memory = None
    if (quota := fields("cpu.max")) and quota[0] != "max":
        cpus = int(quota[0]) / int(quota[1])
    elif (quota := fields("cpu/cpu.cfs_quota_us")) and int(quota[0]) > 0:
        cpus = int(quota[0]) / int(fields("cpu/cpu.cfs_period_us")[0])
    limit = fields("memory.max") or fields("memory/memory.limit_in_bytes")
    if limit and limit[0] != "max":
        memory = int(limit[0])  # cgroup v1 writes "no limit" as ~2^63, more than any machine
    return cpus, memory


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per usable CPU, at most 8 and at most one per 6 GiB of memory (a
    worker is a JAX process keeping its compiled programs: 5.1 GB peak RSS in a full default run on
    2 workers), within the cgroup's CPU quota and memory limit. xdist's own count (psutil's
    physical cores) is 1 on a 2-vCPU VM. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still wins (None defers
    to xdist)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    quota, limit = cgroup_limits()
    cpus = min(cpus, int(quota)) if quota else cpus
    memory = min(memory, limit) if limit else memory
    return max(1, min(cpus, 8, int(memory // (6 * 2**30))))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The vendored official CoBit golden vectors (present in every checkout)."""
    return REFERENCE_DIR
