"""Operating points as table rows: which fields key a point (``POINT_KEYS``, ``point_key``),
mean ± std over seeds (``aggregate``), and the table as CSV or fixed-width text with short labels.
All pure; ``bitgen.eval.sweep`` draws and scores the rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bitgen.config import SamplerConfig

# Fields that identify an operating point (everything except the seed and the measurements);
# ``family``: a family's own sampling options (``Family.settings``), absent for CoBit and AR.
POINT_KEYS = ("model", "evaluator", "name", "grid", "nfe", "gamma", "window_q", "sc_mode", "ati_eta",
              "terminal_sigma", "s_noise", "temperature", "top_p", "step", "family", "loaded_with")
# Keys added after rows were first cached, and the value that leaves one out of ``point_key``: rows
# and sample files cached before a key existed keep their keys, and any other value gets its own.
LATE_KEYS = {"family": None, "terminal_sigma": SamplerConfig.terminal_sigma,
             "s_noise": SamplerConfig.s_noise, "loaded_with": None}
METRIC_KEYS = ("genppl", "entropy", "n_invalid_mean", "seconds")


def point_key(row: dict[str, Any]) -> tuple:
    """The row's ``POINT_KEYS`` values as JSON; a ``LATE_KEYS`` entry that is unset (None: a family
    without that setting) or at its listed value is left out, so such rows key as they did before
    it was listed."""
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in POINT_KEYS
                 if k not in LATE_KEYS or row.get(k) not in (None, LATE_KEYS[k]))


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group rows by operating point; mean and (population) std over seeds of each metric.

    Returns one dict per point, in first-seen order, with the point keys, ``reference`` (real-data
    rows: which rows), ``seeds`` (list), ``n`` (samples per seed) and ``<metric>_mean`` /
    ``<metric>_std``.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((point_key(row), row.get("reference")), []).append(row)
    table = []
    for members in groups.values():
        out = {k: members[0].get(k) for k in POINT_KEYS}
        out["reference"] = members[0].get("reference")
        out["seeds"] = sorted(m["seed"] for m in members)
        out["n"] = members[0]["n"]
        for metric in METRIC_KEYS:
            values = np.asarray([m[metric] for m in members if m.get(metric) is not None], np.float64)
            out[f"{metric}_mean"] = float(values.mean()) if values.size else None
            out[f"{metric}_std"] = float(values.std()) if values.size else None
        table.append(out)
    return table


def write_csv(table: Sequence[dict[str, Any]], path: Path) -> Path:
    """The aggregated table as CSV (lists, tuples and dicts written as JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = (list(POINT_KEYS) + ["reference", "seeds", "n"]
               + [f"{m}_{s}" for m in METRIC_KEYS for s in ("mean", "std")])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
                             for k, v in row.items() if k in columns})
    return path


def format_table(table: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table (what ``bitgen eval``/``bitgen demo`` print); the model and sampler
    columns are as wide as their longest entry (a family's options make long sampler labels)."""
    labels = [describe_point(row) for row in table]
    model_w = max([11, *(len(row["model"]) for row in table)])
    sampler_w = max([28, *map(len, labels)])
    header = (f"{'model':<{model_w}} {'sampler':<{sampler_w}} {'NFE':>4} {'GenPPL':>16} {'entropy':>14} "
              f"{'seeds':>5} {'n':>4}")
    lines = [header, "-" * len(header)]
    for row, label in zip(table, labels):
        lines.append(f"{row['model']:<{model_w}} {label:<{sampler_w}} {row['nfe'] or '':>4} "
                     f"{_pm(row['genppl_mean'], row['genppl_std'], 2):>16} "
                     f"{_pm(row['entropy_mean'], row['entropy_std'], 3):>14} "
                     f"{len(row['seeds']):>5} {row['n']:>4}")
    return "\n".join(lines)


def describe_point(row: dict[str, Any]) -> str:
    """Short label: "ddim entropic γ=0.2", "heun karras PF-ODE", "AR T=0.9 p=1", "held-out rows",
    then a family's own options and the loading choices when set ("T=1 head=diffusion
    guidance=9.0 ...", "ddim entropic γ=0.2 block_tokens=4 ...", "... weights=raw")."""
    if row["model"] == "real data":
        test = (row.get("reference") or "heldout").startswith("test:")
        return "test rows" if test else "held-out rows"
    if row["model"] == "iid unigram":
        return "tokens drawn independently"
    options = {**(row.get("family") or {}), **(row.get("loaded_with") or {})}
    extra = [f"{k}={v}" for k, v in options.items()]
    if row["model"] == "ar":
        return " ".join([f"T={row['temperature']:g} top-p={row['top_p']:g}", *extra])
    if row.get("name") is None:  # a family drawn at a temperature (BitLM)
        return " ".join([f"T={row['temperature']:g}", *extra])
    churn = f"γ={row['gamma']:g}" if row["gamma"] else "PF-ODE (γ=0)"
    return " ".join([f"{row['name']} {row['grid']} {churn}{window_label(row)}", *extra])


def window_label(row: dict[str, Any]) -> str:
    """"" for full-band churn (q in [0, 1]), else " q=lo-hi"."""
    lo, hi = row["window_q"]
    return "" if (lo, hi) == (0.0, 1.0) else f" q={lo:g}-{hi:g}"


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
