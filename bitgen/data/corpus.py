"""Corpus -> tokenised, packed, cached rows ``[N, T]`` and the bit codec that encodes them.

``build_corpus_rows(cfg, seq_tokens)`` runs source -> tokenizer -> packing (-> second-stage
codes for ``packing=window`` with ``data.code_tokenizer``) once and caches the rows on disk;
later calls with the same settings memory-map the cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bitgen.codecs import BitCodec, IdCodeMap
from bitgen.config import DataConfig
from bitgen.data.cache import cache_dir_for, load_cached_rows, write_cached_rows
from bitgen.data.packing import StreamPacker
from bitgen.data.sources import (
    NORMALISATION_VERSION,
    DataError,
    ReadStats,
    TextSource,
    open_source,
)
from bitgen.tokenizers import (
    CodeTokenizer,
    load_tokenizer,
    separator_id,
    tokenizer_hash,
    train_bpe,
    vocab_size_of,
)

ENCODE_BATCH_DOCS = 1024  # documents per tokenizer call: big enough to use every core


@dataclass(frozen=True)
class DatasetStats:
    """What ``bitgen data`` prints. Token counts include separators/EOS; ``rows`` is before the split."""

    source: str
    documents: int
    tokens: int
    rows: int
    seq_tokens: int
    width: int
    vocab_size: int
    dropped_tail_tokens: int
    skipped_bad_utf8: int
    train_rows: int
    val_rows: int
    cache_path: str
    cache_status: str

    @property
    def bits_per_row(self) -> int:
        return self.seq_tokens * self.width

    @property
    def invalid_code_headroom(self) -> int:
        """Codes that name no token, 2^P - V."""
        return 2**self.width - self.vocab_size


@dataclass(frozen=True)
class PackedRows:
    """Packed token rows and everything needed to turn them into bits and back into text."""

    rows: np.ndarray  # [N, T] uint16/uint32 (a read-only memmap of the cache)
    tokenizer: Tokenizer
    codec: BitCodec
    stats: DatasetStats
    code_tokenizer: CodeTokenizer | None = None

    @property
    def train_rows(self) -> np.ndarray:
        return self.rows[: self.stats.train_rows]

    @property
    def val_rows(self) -> np.ndarray:
        return self.rows[self.stats.train_rows:]

    def decode_text(self, ids) -> str:
        """One row of ids ``[T]`` (as produced by ``codec.decode``) -> text (spec §5.4)."""
        ids = np.asarray(ids).tolist()
        if self.code_tokenizer is not None:
            ids = self.code_tokenizer.decode_codes(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def split_sizes(n_rows: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) row counts: val = the last round(val_fraction * n) rows (spec §1.1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    n_val = round(val_fraction * n_rows)  # Python's round, as in the reference
    return n_rows - n_val, n_val


def codec_for(cfg: DataConfig, vocab_size: int, code_tokenizer: CodeTokenizer | None) -> BitCodec:
    """The bit codec for a vocabulary under ``cfg.code_policy`` and ``cfg.bit_order``."""
    if cfg.bit_order == "raw":
        permutation = None
    elif cfg.bit_order == "gray":
        permutation = "gray"
    else:
        path = Path(cfg.bit_order).expanduser()
        if path.suffix != ".npy" or not path.exists():
            raise DataError(
                f"data.bit_order={cfg.bit_order!r} must be raw, gray, or an existing .npy id->code map"
            )
        permutation = IdCodeMap.from_array(np.load(path))
    pad_id, stop_ids = None, ()
    if cfg.code_policy == "stop":
        if code_tokenizer is None:
            raise DataError(
                "data.code_policy=stop needs the PAD/EOSEQ codes of a code tokenizer: set "
                "data.packing=window and data.code_tokenizer, or use code_policy=modulo"
            )
        pad_id, stop_ids = code_tokenizer.pad_id, code_tokenizer.stop_ids
    return BitCodec(vocab_size, policy=cfg.code_policy, pad_id=pad_id, stop_ids=stop_ids,
                    permutation=permutation)


def _resolve_tokenizer(cfg: DataConfig, source: TextSource, progress: bool) -> Tokenizer:
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)
    docs = source.documents()
    if progress:
        from tqdm.auto import tqdm

        docs = tqdm(docs, desc=f"training BPE ({cfg.vocab_size})", unit="doc", leave=False, delay=1.0)
    return train_bpe(docs, cfg.vocab_size, cache_dir=cfg.cache_dir,
                     corpus_fingerprint=json.dumps(source.identity, sort_keys=True))


def _resolve_code_tokenizer(cfg: DataConfig, tokenizer: Tokenizer) -> CodeTokenizer | None:
    if not cfg.code_tokenizer:
        return None
    if cfg.packing != "window":
        raise DataError("data.code_tokenizer is used only with data.packing=window; unset one of them")
    code_tokenizer = CodeTokenizer.load(cfg.code_tokenizer)
    if vocab_size_of(tokenizer) > code_tokenizer.base_vocab_size:
        raise DataError(
            f"the code tokenizer covers {code_tokenizer.base_vocab_size} base ids but the tokenizer "
            f"has {vocab_size_of(tokenizer)}; train the code tokenizer on this tokenizer's ids"
        )
    return code_tokenizer


def build_corpus_rows(cfg: DataConfig, seq_tokens: int, *, progress: bool = False,
                      rebuild: bool = False) -> PackedRows:
    """Tokenise, pack and cache ``cfg.source`` into rows of ``seq_tokens`` tokens (reusing the cache).

    Raises DataError for an empty corpus or one too small for a single row.
    """
    source = open_source(cfg)
    tokenizer = _resolve_tokenizer(cfg, source, progress)
    code_tokenizer = _resolve_code_tokenizer(cfg, tokenizer)
    boundary_id = separator_id(tokenizer)
    vocab_size = code_tokenizer.code_vocab_size if code_tokenizer else vocab_size_of(tokenizer)
    codec = codec_for(cfg, vocab_size, code_tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    fingerprint = {
        "source": source.identity,
        "normalisation": NORMALISATION_VERSION,
        "tokenizer": tokenizer_hash(tokenizer),
        "code_tokenizer": tokenizer_hash(code_tokenizer.tokenizer) if code_tokenizer else None,
        "code_meta": code_tokenizer.meta() if code_tokenizer else None,
        "packing": cfg.packing,
        "seq_tokens": seq_tokens,
        "boundary_id": boundary_id,
        "dtype": dtype.name,
    }
    path = cache_dir_for(cfg.cache_dir, f"{source.name}-{cfg.packing}-T{seq_tokens}", fingerprint)
    cached, status = (None, "rebuild requested") if rebuild else load_cached_rows(path, fingerprint)
    if cached is None:
        read_stats = ReadStats()
        packer = StreamPacker(seq_tokens, cfg.packing, boundary_id)

        def row_batches() -> Iterator[np.ndarray]:
            docs = source.documents(read_stats)
            if progress:
                from tqdm.auto import tqdm

                docs = tqdm(docs, desc=f"tokenising {source.name}", unit="doc", delay=1.0)
            while batch := list(itertools.islice(docs, ENCODE_BATCH_DOCS)):
                encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
                rows = packer.push(e.ids for e in encodings)
                if code_tokenizer is not None and len(rows):
                    rows = code_tokenizer.encode_windows(rows, seq_tokens)
                yield rows
            if read_stats.documents == 0:
                raise DataError(
                    f"data.source={cfg.source!r} yielded no documents (all empty"
                    f"{' or skipped for bad UTF-8' if read_stats.skipped_bad_utf8 else ''}); "
                    "point data.source at a corpus with text"
                )
            if packer.stream_tokens < packer.chunk:
                raise DataError(
                    f"the corpus has {packer.stream_tokens} tokens, fewer than one row of "
                    f"{seq_tokens}; lower model.seq_tokens or add text"
                )

        def build_stats() -> dict:
            return {"documents": read_stats.documents, "tokens": packer.stream_tokens,
                    "dropped_tail_tokens": packer.pending_tokens,
                    "skipped_bad_utf8": read_stats.skipped_bad_utf8}

        cached = write_cached_rows(path, fingerprint, row_batches(), seq_tokens=seq_tokens,
                                   dtype=dtype, stats_fn=build_stats)
        status = f"built ({status})"
    n_rows = cached.rows.shape[0]
    n_train, n_val = split_sizes(n_rows, cfg.val_fraction)
    stats = DatasetStats(source=source.name, rows=n_rows, seq_tokens=seq_tokens, width=codec.width,
                         vocab_size=vocab_size, train_rows=n_train, val_rows=n_val,
                         cache_path=str(path), cache_status=status, **cached.meta["stats"])
    return PackedRows(cached.rows, tokenizer, codec, stats, code_tokenizer)


def stats_dict(stats: DatasetStats) -> dict:
    """Stats plus the derived numbers, JSON-ready."""
    return {**dataclasses.asdict(stats), "bits_per_row": stats.bits_per_row,
            "invalid_code_headroom": stats.invalid_code_headroom}


def dataset_stats(cfg: DataConfig, seq_tokens: int, *, progress: bool = False) -> DatasetStats:
    """Statistics of the packed corpus (builds the cache if needed)."""
    return build_corpus_rows(cfg, seq_tokens, progress=progress).stats
