"""GenPPL–entropy frontier plot of an aggregated sweep table (matplotlib, Agg backend, no display).

x = mean unigram entropy (nats), y = GenPPL (log scale), error bars = std over seeds. CoBit points
that differ only in γ are joined into one curve per (sampler, grid, NFE), so each curve is the
frontier γ traces; AR points (one per temperature) form their own curve; the real-data reference
is a star and the i.i.d.-unigram control a grey cross.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitgen.eval.table import window_label


def frontier_curves(table: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group aggregated rows into labelled curves, each sorted by entropy (pure).

    CoBit and other sampler-swept families: one curve per (family, sampler, grid, NFE, window)
    across γ; AR: one curve per top-p across temperatures; a family drawn at a temperature: one
    per head when it names one (BitLM and its softmax control); real data: its own group.
    """
    curves: dict[str, list[dict[str, Any]]] = {}
    for row in table:
        if row.get("genppl_mean") is None:
            continue
        head = (row.get("family") or {}).get("head")
        model = {"cobit": "CoBit", "ar": "AR"}.get(row["model"], str(row["model"]))
        if row["model"] == "ar":
            label = f"AR (top-p {row['top_p']:g}, temperatures)"
        elif row.get("name") is not None:  # a sampler-swept family: one curve across γ
            label = f"{model} {row['name']} {row['grid']} NFE {row['nfe']}{window_label(row)}"
        else:
            label = model if head is None else f"{model} ({head} head)"
        curves.setdefault(label, []).append(row)
    return {k: sorted(v, key=lambda r: r["entropy_mean"]) for k, v in curves.items()}


def plot_frontier(table: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Write the frontier PNG to ``path`` (parent directories created); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=110)
    for label, rows in frontier_curves(table).items():
        x = [r["entropy_mean"] for r in rows]
        y = [r["genppl_mean"] for r in rows]
        xerr = [r["entropy_std"] or 0.0 for r in rows]
        yerr = [r["genppl_std"] or 0.0 for r in rows]
        if rows[0]["model"] == "real data":
            test = (rows[0].get("reference") or "heldout").startswith("test:")
            ax.plot(x, y, marker="*", markersize=16, linestyle="none", color="black",
                    label=f"real data ({'test split' if test else 'held-out'})")
            continue
        if rows[0]["model"] == "iid unigram":
            ax.plot(x, y, marker="X", markersize=11, linestyle="none", color="grey",
                    label="i.i.d. unigram tokens (control)")
            continue
        style = {"marker": "s", "linestyle": "--"} if rows[0]["model"] == "ar" else {"marker": "o"}
        line = ax.errorbar(x, y, xerr=xerr, yerr=yerr, capsize=2, label=label, **style)
        if rows[0].get("name") is not None:
            for r in rows:  # annotate γ so the direction of the frontier is readable
                ax.annotate(f"{r['gamma']:g}", (r["entropy_mean"], r["genppl_mean"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color=line[0].get_color())
        else:
            for r in rows:
                ax.annotate(f"T={r['temperature']:g}", (r["entropy_mean"], r["genppl_mean"]), fontsize=7,
                            xytext=(3, -9), textcoords="offset points", color=line[0].get_color())
    ax.set_yscale("log")
    ax.set_xlabel("mean unigram entropy of a sample (nats)")
    ax.set_ylabel("GenPPL (lower is better)")
    ax.set_title(title or "GenPPL–entropy frontier (labels: churn γ / AR temperature)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
