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


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The vendored official CoBit golden vectors (present in every checkout)."""
    return REFERENCE_DIR
