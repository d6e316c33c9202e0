"""Train the second-stage code tokenizer ("gpt2id_bpe16", spec §1.2 stage C) from base-id windows.

Writes ``<output>.json`` and ``<output>.meta.json`` (pad/unk/eoseq ids, base_char_offset, code
vocabulary and encoding-length statistics). Point ``data.code_tokenizer`` at the ``.json``.

Windows come either from a data config (``packing=window``, no code tokenizer: the rows are the
``[EOS] + stream + [EOS]`` base windows) or from a ``.npy`` array ``[N, L]`` of base ids.

  python tools/train_code_tokenizer.py --config owt data.code_tokenizer= --output tok/owt_codes.json
  python tools/train_code_tokenizer.py --windows windows.npy --base-vocab-size 50257 --eos-id 50256 \
      --code-vocab-size 65536 --output tok/owt_codes.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bitgen.codecs import width_for_vocab
from bitgen.tokenizers import (
    CodeTokenizer,
    separator_id,
    train_code_tokenizer,
    vocab_size_of,
)

STATS_SAMPLE_WINDOWS = 1000


def _windows_from_config(args: argparse.Namespace) -> tuple[np.ndarray, int, int]:
    from bitgen.config import apply_overrides, load_config
    from bitgen.data import build_corpus_rows

    cfg = load_config(args.config, args.overrides)
    cfg = apply_overrides(cfg, ["data.packing=window", "data.code_tokenizer="])
    packed = build_corpus_rows(cfg.data, cfg.model.seq_tokens, progress=True)
    return np.asarray(packed.train_rows), vocab_size_of(packed.tokenizer), separator_id(packed.tokenizer)


def _windows_from_file(args: argparse.Namespace) -> tuple[np.ndarray, int, int | None]:
    windows = np.load(args.windows, mmap_mode="r")
    if windows.ndim != 2:
        print(f"error: {args.windows} must hold a 2-D [N, L] array of base ids, got shape {windows.shape}",
              file=sys.stderr)
        raise SystemExit(2)  # bad input: the exit status of bitgen.cli
    base_vocab = args.base_vocab_size or int(windows.max()) + 1
    return windows, base_vocab, args.eos_id


def encoding_stats(code_tokenizer: CodeTokenizer, windows: np.ndarray) -> dict:
    """Codes per window (before EOSEQ/PAD) on up to STATS_SAMPLE_WINDOWS windows."""
    sample = windows[:STATS_SAMPLE_WINDOWS]
    rows = code_tokenizer.encode_windows(sample, sample.shape[1] + 1)
    lengths = np.argmax(rows == code_tokenizer.eoseq_id, axis=1)
    return {"base_window_tokens": int(windows.shape[1]), "sampled_windows": len(sample),
            "codes_per_window_mean": float(lengths.mean()), "codes_per_window_max": int(lengths.max()),
            "compression_ratio": float(windows.shape[1] / max(lengths.mean(), 1e-9))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="data config whose window rows are the training windows")
    source.add_argument("--windows", type=Path, help=".npy array [N, L] of base-token windows")
    parser.add_argument("overrides", nargs="*", help="config overrides (with --config)")
    parser.add_argument("--base-vocab-size", type=int, default=0, help="with --windows: base ids (default max+1)")
    parser.add_argument("--eos-id", type=int, default=None, help="with --windows: base EOS id stripped on decode")
    parser.add_argument("--code-vocab-size", type=int, default=65536)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True, help="tokenizer path (.json)")
    args = parser.parse_args(argv)
    if args.output.suffix != ".json":
        parser.error("--output must end in .json (the meta file is written next to it)")
    windows, base_vocab, eos_id = _windows_from_config(args) if args.config else _windows_from_file(args)
    code_tokenizer = train_code_tokenizer(
        windows, base_vocab_size=base_vocab, code_vocab_size=args.code_vocab_size,
        base_eos_id=eos_id, min_frequency=args.min_frequency,
    )
    meta_path = code_tokenizer.save(args.output, extra_meta=encoding_stats(code_tokenizer, windows))
    print(f"wrote {args.output} and {meta_path}: {code_tokenizer.code_vocab_size} codes "
          f"({width_for_vocab(code_tokenizer.code_vocab_size)} bits per code)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
