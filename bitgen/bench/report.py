"""The whole benchmark run, the targets it is judged by, and its Markdown summary."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from bitgen.bench.generation import bench_generation
from bitgen.bench.heads import DEFAULT_HEAD_CHUNK_TOKENS, bench_heads
from bitgen.bench.programs import bench_sampler, bench_train_step, trunk_config
from bitgen.bench.timing import backend_info, load_average, matmul_limit

HEAD_MEMORY_TARGET = 0.01  # bit path ≤ 1% of the token path's memory at the largest V
TRAIN_FRACTION_TARGET = 0.5  # CPU fp32 train FLOP/s ≥ 50% of the matmul limit (CoBit-S)
SAMPLER_OVERHEAD_TARGET = 1.05


def run_bench(*, dtype: str, matmul_size: int, matmul_chain: int, matmul_repeats: int,
              train: Sequence[tuple[str, int]], train_repeats: int,
              sampler: Sequence[tuple[str, int]], sampler_repeats: int, nfe: int,
              heads: Sequence[tuple[int, int]], head_trunk: str, head_batch: int,
              head_repeats: int, head_time_budget_s: float,
              head_chunk_tokens: int = DEFAULT_HEAD_CHUNK_TOKENS, seq_tokens: int = 128,
              patch_size: int = 15, generation: dict[str, Any] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every requested measurement in this process and return the report dict.

    Train and sampler runs use T=``seq_tokens`` tokens of P=``patch_size`` bits; the head
    comparison sets T and P from each (T, V). ``generation``: keyword arguments of
    ``bench_generation`` (size, batches, labels, repeats), or None to skip that section.
    """
    trunk = functools.partial(trunk_config, dtype=dtype, seq_tokens=seq_tokens, patch_size=patch_size)
    report: dict[str, Any] = {"machine": backend_info(), "load_average_before": load_average(),
                              "compute_dtype": dtype}
    log(f"backend {report['machine']['backend']} ({report['machine']['device_kind']}), "
        f"dtype {dtype}, load {report['load_average_before']}")
    if matmul_size < 1:
        raise ValueError(f"matmul_size={matmul_size} must be >= 1")
    report["matmul"] = matmul_limit(matmul_size, dtype, chain=matmul_chain, repeats=matmul_repeats)
    peak = report["matmul"]["flops_per_s"]
    log(f"matmul {matmul_size}: {peak / 1e9:.1f} GFLOP/s")
    report["train"] = []
    for name, batch in train:
        row = bench_train_step(trunk(name), batch, repeats=train_repeats,
                               matmul_size=matmul_size, name=name)
        report["train"].append(row)
        log(f"train {name} b={batch}: {row['median_s']:.3f}s/step, {row['tokens_per_s']:.0f} tok/s, "
            f"{row['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{row['fraction_of_matmul_limit']:.1%} of the matmul limit")
    report["sampler"] = []
    for name, batch in sampler:
        row = bench_sampler(trunk(name), batch, nfe=nfe,
                            repeats=sampler_repeats, name=name)
        report["sampler"].append(row)
        log(f"sampler {name} b={batch}: overhead {row['overhead_ratio']:.3f} "
            f"(vs a loop of bare calls {row['loop_overhead_ratio']:.3f})")
    report["heads"] = []
    if heads:
        report["heads"] = bench_heads(trunk_config(head_trunk, dtype=dtype), heads, head_batch,
                                      repeats=head_repeats, peak_flops=peak,
                                      time_budget_s=head_time_budget_s,
                                      chunk_tokens=head_chunk_tokens)
        report["head_trunk"] = head_trunk
        log("heads: " + ", ".join(f"V={r['vocab']} ratio {r['memory_ratio']:.4f} "
                                  f"(unchunked {r['unchunked_memory_ratio']:.4f})"
                                  for r in report["heads"]))
    if generation is not None:
        report["generation"] = bench_generation(**generation, dtype=dtype, peak_flops=peak, log=log)
    report["matmul_limit_flops_per_s"] = peak
    report["load_average_after"] = load_average()
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Which issue targets the report meets (None where not measured)."""
    out: dict[str, Any] = {}
    trunk_rows = [r for r in report.get("train", []) if r["trunk"] == "cobit-s"]
    if trunk_rows:
        frac = trunk_rows[0]["fraction_of_matmul_limit"]
        out["train_fraction_cobit_s"] = {"value": frac, "target": TRAIN_FRACTION_TARGET,
                                         "met": frac >= TRAIN_FRACTION_TARGET}
    if report.get("sampler"):
        for key in ("overhead_ratio", "loop_overhead_ratio"):
            worst = max(r[key] for r in report["sampler"])
            out[f"sampler_{key}"] = {"value": worst, "target": SAMPLER_OVERHEAD_TARGET,
                                     "met": worst <= SAMPLER_OVERHEAD_TARGET}
    if report.get("heads"):
        largest = max(report["heads"], key=lambda r: r["vocab"])
        out["head_memory_ratio"] = {"value": largest["memory_ratio"], "vocab": largest["vocab"],
                                    "head_chunk_tokens": largest["head_chunk_tokens"],
                                    "target": HEAD_MEMORY_TARGET,
                                    "met": largest["memory_ratio"] <= HEAD_MEMORY_TARGET}
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return ["", *lines, *("| " + " | ".join(row) + " |" for row in rows)]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ms(entry: Any) -> str:
    return f"{entry['median_s'] * 1e3:.1f} ms" if isinstance(entry, dict) else "skipped"


def format_table(report: dict[str, Any]) -> str:
    """A short Markdown summary of the report."""
    m = report["machine"]
    lines = [
        (f"machine: {m['cpu_model']} ({m['cpu_cores']} cores), backend {m['backend']} "
        f"({m['device_kind']} x{m['device_count']}), jax {m['jax_version']}, "
        f"dtype {report['compute_dtype']}"),
        (f"load average before {report['load_average_before']}, after "
        f"{report['load_average_after']}"),
        (f"matmul limit: {report['matmul_limit_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(n={report['matmul']['size']}, chain of {report['matmul']['chain']})"),
    ]
    if report.get("train"):
        lines += _table(
            ["trunk", "batch", "params", "compile s", "step s", "tokens/s", "GFLOP/step",
             "GFLOP/s", "matmul GFLOP/s", "of limit"],
            [[r["trunk"], str(r["batch"]), f"{r['params'] / 1e6:.1f}M", f"{r['compile_s']:.1f}",
              f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_step'] / 1e9:.1f}",
              f"{r['achieved_flops_per_s'] / 1e9:.1f}", f"{r['matmul_limit_flops_per_s'] / 1e9:.1f}",
              f"{r['fraction_of_matmul_limit']:.1%}"] for r in report["train"]])
    if report.get("sampler"):
        lines += _table(
            ["trunk", "batch", "calls", "sampler s", "bare call ms", "overhead", "bare loop s",
             "overhead vs loop", "samples/s", "tokens/s"],
            [[r["trunk"], str(r["batch"]), str(r["model_calls"]), f"{r['sampler']['median_s']:.2f}",
              f"{r['bare_call']['median_s'] * 1e3:.2f}", f"{r['overhead_ratio']:.3f}",
              f"{r['bare_loop']['median_s']:.2f}", f"{r['loop_overhead_ratio']:.3f}",
              f"{r['samples_per_s']:.3f}", f"{r['tokens_per_s']:.1f}"] for r in report["sampler"]])
    if report.get("heads"):
        lines += _table(
            ["T", "V", "P", "chunk", "bit mem", "token mem", "ratio", "fwd-only ratio",
             "unchunked bit mem", "unchunked ratio", "bit time", "unchunked bit time",
             "token time"],
            [[str(r["seq_tokens"]), str(r["vocab"]), str(r["bits_per_token"]),
              str(r["head_chunk_tokens"] or "off"),
              _mib(r["bit"]["memory"]["peak_bytes"]), _mib(r["token"]["memory"]["peak_bytes"]),
              f"{r['memory_ratio']:.2%}", f"{r['forward_memory_ratio']:.2%}",
              _mib(r.get("bit_unchunked", r["bit"])["memory"]["peak_bytes"]),
              f"{r['unchunked_memory_ratio']:.2%}", _ms(r["bit"]["time"]),
              _ms(r.get("bit_unchunked", r["bit"])["time"]), _ms(r["token"]["time"])]
             for r in report["heads"]])
    if report.get("generation"):
        lines += generation_table(report["generation"])
    if report.get("targets"):
        lines.append("")
        lines += [f"target {name}: {t['value']:.4g} vs {t['target']} -> "
                  f"{'met' if t['met'] else 'NOT met'}" for name, t in report["targets"].items()]
    return "\n".join(lines)


def generation_table(section: dict[str, Any]) -> list[str]:
    """The generation rows with their cost model: passes and model FLOPs per generated token."""
    rows = []
    for r in section["rows"]:
        c = r["cost"]
        head = (f"{c['head_passes_per_token']:.2f} × {c['head_tokens']}" if c["head_passes"]
                else "in backbone")
        limit = r["fraction_of_matmul_limit"]
        rows.append([r["generator"], str(r["batch"]), f"{r['tokens_per_s']:.0f}",
                     f"{r['median_s'] * 1e3:.1f}", f"{r['spread']:.0%}",
                     f"{c['backbone_passes_per_token']:.2f} × {c['backbone_tokens']}", head,
                     f"{c['flops_per_token'] / 1e6:.2f}", f"{r['achieved_flops_per_s'] / 1e9:.2f}",
                     "-" if limit is None else f"{limit:.1%}"])
    return ["", f"generation: size {section['size']} (V={section['vocab_size']}), "
            f"{section['compute_dtype']}, early stop off (every row generates all T tokens), "
            f"median of {section['repeats']} after a warm-up",
            *_table(["generator", "batch", "tokens/s", "median ms", "spread (max-min)/med",
                     "backbone passes/token × tokens", "head passes/token × tokens",
                     "MFLOP/token", "GFLOP/s", "of limit"], rows)]
