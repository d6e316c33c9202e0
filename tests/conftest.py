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
SHARED = REPO_ROOT.parent / "shared"
REFERENCE_DIR = SHARED / "reference" / "cobit"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official CoBit golden vectors (../shared/reference/cobit); skip where absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {REFERENCE_DIR} (../shared is absent in this checkout)")
    return REFERENCE_DIR
