"""The cgroup limits that cap ``-n auto``'s worker count (tests/conftest.py), on written files."""

from __future__ import annotations

import pytest

from conftest import cgroup_limits

V1_UNLIMITED = "9223372036854771712"


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000", "memory.max": "8589934592"}, (2.0, 8 * 2**30)),
    ({"cpu.max": "max 100000", "memory.max": "max"}, (None, None)),
    ({"cpu/cpu.cfs_quota_us": "150000", "cpu/cpu.cfs_period_us": "100000",
      "memory/memory.limit_in_bytes": "4294967296"}, (1.5, 4 * 2**30)),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
      "memory/memory.limit_in_bytes": V1_UNLIMITED}, (None, int(V1_UNLIMITED))),
    ({}, (None, None)),
])
def test_cgroup_limits_read_v2_then_v1(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert cgroup_limits(tmp_path) == expected
