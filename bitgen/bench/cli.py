"""``bitgen bench`` command line: flags, per-backend defaults, JSON report and summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from bitgen.bench.generation import GEN_SIZES, GENERATORS, registered
from bitgen.bench.heads import DEFAULT_HEAD_CHUNK_TOKENS, DEFAULT_HEADS
from bitgen.bench.programs import TRUNKS
from bitgen.bench.report import format_table, run_bench
from bitgen.bench.timing import default_dtype
from bitgen.errors import BitgenError


def _trunk_batch(spec: str) -> tuple[str, int]:
    name, _, batch = spec.partition(":")
    if name not in TRUNKS or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected TRUNK:BATCH with TRUNK in {sorted(TRUNKS)}, e.g. cobit-s:4")
    return name, int(batch)


def _tokens_vocab(spec: str) -> tuple[int, int]:
    t, _, v = spec.partition(":")
    if not (t.isdigit() and v.isdigit()) or int(t) < 1 or int(v) < 2:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected T:V (tokens:vocab), e.g. 1024:65536")
    return int(t), int(v)


def _batches(spec: str) -> tuple[int, ...]:
    parts = spec.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected comma-separated batch sizes >= 1, e.g. --gen-batches 1,64")
    return tuple(int(p) for p in parts)


def _generators(spec: str) -> tuple[str, ...]:
    """Comma-separated generator labels or family names -> the labels they select."""
    available = registered()
    chosen: list[str] = []
    for name in (p.strip() for p in spec.split(",")):
        match = [g.label for g in available if name in (g.label, g.family)]
        if not match:
            known = sorted({g.label for g in available} | {g.family for g in available})
            missing = " (its family is not registered in this build)" if any(
                name in (g.label, g.family) for g in GENERATORS) else ""
            raise argparse.ArgumentTypeError(
                f"{name!r}{missing}: expected comma-separated generators or families from {known}, "
                "e.g. --gen-families ar,bitlm")
        chosen += [label for label in match if label not in chosen]
    return tuple(chosen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench_report.json"),
                        help="JSON report path (default: %(default)s)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="n of the n×n matmul limit (0 = 2048 on CPU, 8192 elsewhere)")
    parser.add_argument("--matmul-chain", type=int, default=16,
                        help="dependent matmuls per timed call of the limit (default: %(default)s)")
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--train", type=_trunk_batch, nargs="*", default=None,
                        help="TRUNK:BATCH train-step runs (default: cobit-s:4 small:16 on CPU, "
                             "cobit-s:64 small:128 elsewhere)")
    parser.add_argument("--train-repeats", type=int, default=5)
    parser.add_argument("--sampler", type=_trunk_batch, nargs="*", default=None,
                        help="TRUNK:BATCH sampler runs (default: small:2 on CPU, "
                             "cobit-s:64 small:64 elsewhere)")
    parser.add_argument("--sampler-repeats", type=int, default=3)
    parser.add_argument("--seq-tokens", type=int, default=128,
                        help="T of the train and sampler runs (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, default=15,
                        help="P (bits per token) of the train and sampler runs (default: %(default)s)")
    parser.add_argument("--nfe", type=int, default=256,
                        help="sampler NFE label (256 = 255 grid points, the LM1B headline)")
    parser.add_argument("--heads", type=_tokens_vocab, nargs="*", default=list(DEFAULT_HEADS),
                        help="T:V head comparisons (default: "
                             + " ".join(f"{t}:{v}" for t, v in DEFAULT_HEADS) + ")")
    parser.add_argument("--head-trunk", choices=sorted(TRUNKS), default="cobit-s",
                        help="trunk width E of the head comparison")
    parser.add_argument("--head-batch", type=int, default=1)
    parser.add_argument("--head-chunk-tokens", type=int, default=DEFAULT_HEAD_CHUNK_TOKENS,
                        help="bit head chunk in tokens (the gcd with each T is used; 0 = "
                             "unchunked only; default: %(default)s)")
    parser.add_argument("--head-repeats", type=int, default=3)
    parser.add_argument("--head-time-budget", type=float, default=30.0,
                        help="skip timing a head when its estimated run time exceeds this (s)")
    parser.add_argument("--generation", action="store_true",
                        help="add the generation section: generated tokens/s of every generator of "
                             "bitgen.bench.generation.GENERATORS at one backbone size (off by "
                             "default: minutes on 2 CPU cores, see docs/benchmarks.md)")
    parser.add_argument("--gen-size", choices=sorted(GEN_SIZES), default=None,
                        help="shared backbone size of the generation section (default: demo, "
                             "demo_cpu's trunk: E=128, 2 blocks, T=32, V=8192)")
    parser.add_argument("--gen-batches", type=_batches, default=None,
                        help="batch sizes of the generation section (default: 1,64)")
    parser.add_argument("--gen-families", type=_generators, default=None,
                        help="comma-separated generators or families to time (default: every "
                             "registered one of " + ",".join(g.label for g in GENERATORS) + ")")
    parser.add_argument("--gen-repeats", type=int, default=None,
                        help="timed rounds per batch after one warm-up round (default: 3)")


class GenerationFlagError(BitgenError, ValueError):
    """A generation flag without ``--generation``, or a bad repeat count."""


def generation_options(args: argparse.Namespace) -> dict | None:
    """The generation section's settings from the flags (None when ``--generation`` is off)."""
    given = [flag for flag, value in (("--gen-size", args.gen_size), ("--gen-batches", args.gen_batches),
                                      ("--gen-families", args.gen_families),
                                      ("--gen-repeats", args.gen_repeats)) if value is not None]
    if not args.generation:
        if given:
            raise GenerationFlagError(f"{', '.join(given)} given without --generation; add "
                                      "--generation to run the generation section")
        return None
    repeats = 3 if args.gen_repeats is None else args.gen_repeats
    if repeats < 1:
        raise GenerationFlagError(f"--gen-repeats {repeats} must be >= 1")
    return {"size": args.gen_size or "demo", "batches": args.gen_batches or (1, 64),
            "labels": args.gen_families, "repeats": repeats}


def run(args: argparse.Namespace) -> int:
    generation = generation_options(args)
    accelerator = jax.default_backend() != "cpu"
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    matmul_size = args.matmul_size or (8192 if accelerator else 2048)
    train = args.train if args.train is not None else (
        [("cobit-s", 64), ("small", 128)] if accelerator else [("cobit-s", 4), ("small", 16)])
    sampler = args.sampler if args.sampler is not None else (
        [("cobit-s", 64), ("small", 64)] if accelerator else [("small", 2)])
    report = run_bench(dtype=dtype, matmul_size=matmul_size, matmul_chain=args.matmul_chain,
                       matmul_repeats=args.matmul_repeats,
                       train=train, train_repeats=args.train_repeats, sampler=sampler,
                       sampler_repeats=args.sampler_repeats, nfe=args.nfe, heads=args.heads,
                       head_trunk=args.head_trunk, head_batch=args.head_batch,
                       head_repeats=args.head_repeats, head_time_budget_s=args.head_time_budget,
                       head_chunk_tokens=args.head_chunk_tokens,
                       seq_tokens=args.seq_tokens, patch_size=args.patch_size,
                       generation=generation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"report written to {args.out}")
    return 0
