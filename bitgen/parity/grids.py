"""Parity of σ-grids, entropy quantiles and churn windows with grids.npz (shipped tables).

Array names are discovered from the fixture (``<table>_entropic_N<n>``, ``karras_N<n>``, ...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bitgen.diffusion.entropy_schedule import load_entropy_table, reference_linspace
from bitgen.diffusion.grids import (
    churn_window,
    entropic_grid,
    entropy_quantile,
    karras_grid,
)
from bitgen.parity import CheckResult, compare, load_npz

# torch's vectorised float32 pow is not correctly rounded; numpy's is (1-ulp differences).
POW_NOTE = "float32 pow rounding differs by <=1 ulp"


def checks(fixture_dir: Path) -> Iterator[CheckResult]:
    data = load_npz(fixture_dir, "grids.npz")
    settings = _settings(fixture_dir)
    terminal = float(settings.get("terminal_sigma(sigma_min_override)", 0.08))
    sigma_max = float(settings.get("sigma_max", 80.0))
    rho = float(settings.get("rho", 7.0))
    tables: dict[str, object] = {}

    def table(name):
        if name not in tables:
            tables[name] = load_entropy_table(name)
        return tables[name]

    for key in sorted(data):
        want = data[key]
        if m := re.fullmatch(r"(\w+?)_entropic_N(\d+)", key):
            got = entropic_grid(table(m[1]), int(m[2]), terminal, sigma_max)
            yield compare(f"grids.{key}", got, want, rtol=0, atol=0)
        elif m := re.fullmatch(r"(\w+?)_entropic_N(\d+)_blend(\d+)", key):
            alpha = float(f"0.{m[3][1:]}") if m[3].startswith("0") else float(m[3])
            got = entropic_grid(table(m[1]), int(m[2]), terminal, sigma_max, blend_alpha=alpha, rho=rho)
            yield compare(f"grids.{key}", got, want, rtol=2.5e-7, atol=0, note=POW_NOTE)
        elif m := re.fullmatch(r"karras_N(\d+)(_sigmamin(\d+))?", key):
            lo = float(f"0.{m[3][1:]}") if m[3] else terminal
            yield compare(f"grids.{key}", karras_grid(int(m[1]), lo, sigma_max, rho), want,
                          rtol=2.5e-7, atol=0, note=POW_NOTE)
        elif m := re.fullmatch(r"(\w+?)_quantile", key):
            got = [entropy_quantile(table(m[1]), q) for q in data["quantile_q"]]
            yield compare(f"grids.{key}", np.array(got), want, rtol=0, atol=0)
        elif m := re.fullmatch(r"(\w+?)_window_q(\d+)_(\d+)", key):
            q_lo, q_hi = (_quantile_from_tag(t) for t in (m[2], m[3]))
            got = churn_window(table(m[1]), q_lo, q_hi, terminal, sigma_max)
            yield compare(f"grids.{key}", np.array(got), want, rtol=0, atol=0)
        elif m := re.fullmatch(r"dbg_(\w+?)_entropic_N(\d+)_u", key):
            # the grids depend on the reference's float32 linspace rounding; check it directly
            lin = data.get(f"dbg_{m[1]}_entropic_N{m[2]}_linspace")
            if lin is not None:
                yield compare(f"grids.dbg_{m[1]}_N{m[2]}_linspace",
                              reference_linspace(0.0, 1.0, int(m[2])), lin, rtol=0, atol=0)


def _quantile_from_tag(tag: str) -> float:
    """'0' -> 0.0, '1' -> 1.0, '01' -> 0.1, '09' -> 0.9 (the fixture's naming)."""
    return float(tag) if len(tag) == 1 else float(f"0.{tag[1:]}")


def _settings(fixture_dir: Path) -> dict:
    path = Path(fixture_dir) / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("files", {}).get("grids.npz", {}).get("settings", {})
