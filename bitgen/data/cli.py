"""``bitgen data``: build (or reuse) the tokenised, packed dataset of a config and print its statistics."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from bitgen.config import ExperimentConfig, apply_overrides, load_config

# Without --config the demo uses the embedded corpus with short rows so it builds in seconds.
DEMO_SEQ_TOKENS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config name in configs/ or a .py/.json path (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. data.vocab_size=4096")
    parser.add_argument("--show", type=int, default=1, metavar="N", help="print the text of the first N rows")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cache even when it is valid")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config(args: argparse.Namespace) -> ExperimentConfig:
    if args.config:
        return load_config(args.config, args.overrides)
    base = ExperimentConfig()
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, seq_tokens=DEMO_SEQ_TOKENS))
    return apply_overrides(base, args.overrides)


def run(args: argparse.Namespace) -> int:
    from bitgen.data.corpus import build_corpus_rows, document_summary

    cfg = _config(args)
    packed = build_corpus_rows(cfg.data, cfg.model.seq_tokens, progress=not args.no_progress,
                               rebuild=args.rebuild)
    s = packed.stats
    codec = packed.codec
    lines = [
        ("source", s.source),
        ("documents", document_summary(s)),
        ("tokens", f"{s.tokens:,} (separators included; {s.dropped_tail_tokens:,} tail tokens dropped)"),
        ("rows", f"{s.rows:,} x {s.seq_tokens} tokens (train {s.train_rows:,}, val {s.val_rows:,})"),
        ("vocab", f"{s.vocab_size:,}"),
        ("bits per token P", f"{s.width}"),
        ("bits per row", f"{s.bits_per_row:,}"),
        ("invalid-code headroom", f"{s.invalid_code_headroom:,} codes (2^{s.width} - {s.vocab_size:,}), policy {codec.policy}"),
        ("bit order", f"{cfg.data.bit_order}"),
        ("cache", f"{s.cache_path} [{s.cache_status}; source hashed in {packed.source_hash_seconds:.2f} s]"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    for i in range(min(args.show, s.rows)):
        text = packed.text_codec.decode_bits(codec.ids_to_bits(np.asarray(packed.rows[i])[None]))[0].text
        print(f"\nrow {i} (bits -> ids -> text):\n{text!r}")
    return 0
