"""Parity checks against fixture directories in the format of the official CoBit golden vectors.

Each suite module (``SUITES``) exposes ``checks(fixture_dir: Path) -> Iterator[CheckResult]``;
``tools/parity.py`` runs them all. A check passes when every element satisfies
``|got - want| <= atol`` or ``|got - want| <= rtol * |want|``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Order matters only for reading the report: foundations first.
SUITES = ("codec", "model", "loss", "entropy", "grids", "samplers")

RTOL = 1e-5  # float32 model outputs, losses and tables
ATOL = 1e-6  # near zero


@dataclass(frozen=True)
class CheckResult:
    name: str
    max_abs: float
    max_rel: float
    passed: bool
    note: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        note = f"  ({self.note})" if self.note else ""
        return f"{status}  {self.name:<52} max_abs={self.max_abs:.3e}  max_rel={self.max_rel:.3e}{note}"


def compare(name: str, got, want, *, rtol: float = RTOL, atol: float = ATOL, note: str = "") -> CheckResult:
    """Elementwise comparison of two arrays of the same shape (shape mismatch fails)."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return CheckResult(name, float("inf"), float("inf"), False,
                           f"shape {got.shape} != expected {want.shape}")
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    both_nonfinite = ~np.isfinite(w) & (g == w)
    diff = np.where(both_nonfinite, 0.0, np.abs(g - w))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(w), np.finfo(np.float64).tiny)
    ok = (diff <= atol) | (diff <= rtol * np.abs(w))
    max_abs = float(diff.max()) if diff.size else 0.0
    # Relative error is reported over elements away from zero (|want| > ATOL), whatever atol
    # the check uses, so the report always shows the strict float32 figure.
    max_rel = float(np.where(np.abs(w) > ATOL, rel, 0.0).max()) if diff.size else 0.0
    return CheckResult(name, max_abs, max_rel, bool(ok.all()), note)


def load_npz(fixture_dir: Path, name: str) -> dict[str, np.ndarray]:
    path = Path(fixture_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"fixture file {path} is missing; is {fixture_dir} a CoBit fixture directory?")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_json(fixture_dir: Path, name: str) -> dict:
    path = Path(fixture_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"fixture file {path} is missing; is {fixture_dir} a CoBit fixture directory?")
    return json.loads(path.read_text())
