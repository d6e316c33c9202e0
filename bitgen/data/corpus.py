"""Corpus -> tokenised, packed, cached rows ``[N, T]`` and the bit codec that encodes them
(``data.source=sudoku``: the generated Sudoku set, ``bitgen.data.sudoku_corpus``).

``build_corpus_rows(cfg, seq_tokens)`` runs source -> tokenizer -> packing (-> second-stage
codes for ``packing=window`` with ``data.code_tokenizer``) once and caches the rows on disk;
later calls with the same settings memory-map the cache.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bitgen.codecs import BitCodec, IdCodeMap
from bitgen.config import DataConfig
from bitgen.data.cache import cache_dir_for, load_cached_rows, write_cached_rows
from bitgen.data.packing import StreamPacker
from bitgen.data.rows import DatasetStats, PackedRows
from bitgen.data.sources import (
    NORMALISATION_VERSION,
    DataError,
    ReadStats,
    TextSource,
    open_source,
)
from bitgen.data.sudoku_corpus import SUDOKU_SOURCE, sudoku_packed_rows
from bitgen.tokenizers import (
    CodeTokenizer,
    load_tokenizer,
    separator_id,
    tokenizer_hash,
    train_bpe,
    vocab_size_of,
)

ENCODE_BATCH_DOCS = 1024  # documents per tokenizer call: big enough to use every core
ENCODE_BATCH_CHARS = 4_000_000  # characters per tokenizer call: bounds the memory of one call


def split_sizes(n_rows: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) row counts: val = the last round(val_fraction * n) rows (spec §1.1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    n_val = round(val_fraction * n_rows)  # Python's round, as in the reference
    return n_rows - n_val, n_val


COUNT_CHUNK_ROWS = 1 << 16  # rows per bincount call: bounds the int64 copy of a memmap chunk
CODE_MAP_FILE = "code_map.npy"  # a run's id -> code map, for codecs that derive it from the data


def token_counts(rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[vocab_size]`` int64 counts of the ids in ``rows`` ``[N, T]``, read in chunks."""
    counts = np.zeros(vocab_size, np.int64)
    for start in range(0, len(rows), COUNT_CHUNK_ROWS):
        chunk = np.asarray(rows[start:start + COUNT_CHUNK_ROWS], np.int64).ravel()
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    return counts


def frequency_rank_codes(train_rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[V]`` id -> code map: the i-th most frequent id of ``train_rows`` gets code i.

    Ties (and unseen ids) keep id order, so the map is a pure function of the rows. With MSB-first
    bits, frequent tokens then share long runs of leading zeros.
    """
    counts = token_counts(train_rows, vocab_size)
    codes = np.empty(vocab_size, np.uint32)
    codes[np.argsort(-counts, kind="stable")] = np.arange(vocab_size, dtype=np.uint32)
    return codes


def codec_for(cfg: DataConfig, vocab_size: int, code_tokenizer: CodeTokenizer | None,
              train_rows: np.ndarray | None = None) -> BitCodec:
    """The bit codec for a vocabulary under ``cfg.code_policy`` and ``cfg.bit_order``.

    ``bit_order=frequency`` ranks ids by their count in ``train_rows`` (required then).
    """
    if cfg.bit_order == "raw":
        permutation = None
    elif cfg.bit_order == "gray":
        permutation = "gray"
    elif cfg.bit_order == "frequency":
        if train_rows is None:
            raise DataError("data.bit_order=frequency needs the training rows to count token frequencies")
        permutation = IdCodeMap.from_array(frequency_rank_codes(train_rows, vocab_size))
    else:
        path = Path(cfg.bit_order).expanduser()
        if path.suffix != ".npy" or not path.exists():
            raise DataError(
                f"data.bit_order={cfg.bit_order!r} must be raw, gray, frequency, or an existing .npy "
                "id->code map"
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


def resolve_code_tokenizer(cfg: DataConfig, tokenizer: Tokenizer) -> CodeTokenizer | None:
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


def split_document(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, before whitespace where possible.

    A cut falls just before the last whitespace character of the window, so byte-level BPE sees
    the word that follows it with its leading space, as it would in the whole document.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_documents(docs: Iterator[str], tokenizer: Tokenizer, max_chars: int, counters: dict, *,
                     batch_docs: int = ENCODE_BATCH_DOCS) -> Iterator[list[np.ndarray]]:
    """Token ids of each document, in order, in groups of at most ``batch_docs`` documents.

    One tokenizer call covers at most ``batch_docs`` documents or ENCODE_BATCH_CHARS
    characters; a document longer than ``max_chars`` is tokenised piece by piece (counted in
    ``counters["split_documents"]``), so its memory is bounded by the pieces, not its length.
    """
    def encode(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int64) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    batch: list[str] = []
    chars = 0
    for doc in docs:
        if len(doc) > max_chars:
            counters["split_documents"] += 1
            pieces = split_document(doc, max_chars)
            per_call = max(1, ENCODE_BATCH_CHARS // max_chars)
            ids = [a for i in range(0, len(pieces), per_call) for a in encode(pieces[i:i + per_call])]
            done = encode(batch) if batch else []
            batch, chars = [], 0
            yield done + [np.concatenate(ids)]
            continue
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= batch_docs or chars >= ENCODE_BATCH_CHARS:
            yield encode(batch)
            batch, chars = [], 0
    if batch:
        yield encode(batch)


def build_corpus_rows(cfg: DataConfig, seq_tokens: int, *, progress: bool = False,
                      rebuild: bool = False) -> PackedRows:
    """Tokenise, pack and cache ``cfg.source`` into rows of ``seq_tokens`` tokens (reusing the cache).

    Raises DataError for an empty corpus or one too small for a single row. ``data.source=sudoku``
    is the generated Sudoku set instead (``bitgen.data.sudoku_corpus``).
    """
    if cfg.source == SUDOKU_SOURCE:
        return sudoku_packed_rows(cfg, seq_tokens, progress=progress, rebuild=rebuild)
    if cfg.max_document_chars < 1:
        raise DataError(f"data.max_document_chars={cfg.max_document_chars} must be >= 1 (default 1000000)")
    source = open_source(cfg)
    tokenizer = _resolve_tokenizer(cfg, source, progress)
    code_tokenizer = resolve_code_tokenizer(cfg, tokenizer)
    boundary_id = separator_id(tokenizer)
    vocab_size = code_tokenizer.code_vocab_size if code_tokenizer else vocab_size_of(tokenizer)
    # Settings errors surface before the (long) build. A frequency code map needs the rows: its
    # other settings are checked with raw codes now and the codec is built after the rows.
    if cfg.bit_order == "frequency":
        codec_for(dataclasses.replace(cfg, bit_order="raw"), vocab_size, code_tokenizer)
        codec = None
    else:
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
        "max_document_chars": cfg.max_document_chars,
    }
    path = cache_dir_for(cfg.cache_dir, f"{source.name}-{cfg.packing}-T{seq_tokens}", fingerprint)
    cached, status = (None, "rebuild requested") if rebuild else load_cached_rows(path, fingerprint)
    if cached is None:
        read_stats = ReadStats()
        packer = StreamPacker(seq_tokens, cfg.packing, boundary_id)
        counters = {"split_documents": 0}

        def row_batches() -> Iterator[np.ndarray]:
            # The bar is advanced by hand: wrapping the document generator in tqdm and slicing the
            # wrapper would let tqdm close the generator after the first slice.
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=source.records, desc=f"tokenising {source.name}", unit="doc", delay=1.0)
            seen = 0
            try:
                for ids in encode_documents(source.documents(read_stats), tokenizer,
                                            cfg.max_document_chars, counters):
                    if bar is not None:
                        bar.update(read_stats.records - seen)
                        seen = read_stats.records
                    rows = packer.push(ids)
                    if code_tokenizer is not None and len(rows):
                        rows = code_tokenizer.encode_windows(rows, seq_tokens)
                    yield rows
            finally:
                if bar is not None:
                    bar.close()
            if not read_stats.complete(source.records):
                raise DataError(
                    f"read {read_stats.records:,} records of {cfg.source!r}, expected "
                    f"{source.records} (the source changed while it was read, or the reader stopped "
                    "early); nothing was cached: run the command again"
                )
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
                    "skipped_bad_utf8": read_stats.skipped_bad_utf8,
                    "skipped_empty": read_stats.skipped_empty,
                    "split_documents": counters["split_documents"],
                    "records": read_stats.records}

        cached = write_cached_rows(path, fingerprint, row_batches(), seq_tokens=seq_tokens,
                                   dtype=dtype, stats_fn=build_stats)
        status = f"built ({status})"
    recorded = cached.meta["stats"]
    if source.records is not None and recorded["records"] != source.records:
        raise DataError(
            f"the row cache {path} records {recorded['records']:,} source records read but "
            f"{cfg.source!r} has {source.records:,}; delete {path} (or pass --rebuild) to rebuild it"
        )
    n_rows = cached.rows.shape[0]
    n_train, n_val = split_sizes(n_rows, cfg.val_fraction)
    if codec is None:
        codec = codec_for(cfg, vocab_size, code_tokenizer, cached.rows[:n_train])
    stats = DatasetStats(source=source.name, rows=n_rows, seq_tokens=seq_tokens, width=codec.width,
                         vocab_size=vocab_size, train_rows=n_train, val_rows=n_val,
                         cache_path=str(path), cache_status=status, **recorded)
    return PackedRows(cached.rows, tokenizer, codec, stats, code_tokenizer, source.identity_seconds)


def pin_code_map(run_dir: str | Path, codec: BitCodec, *, write: bool) -> None:
    """Keep a run's id -> code map in ``run_dir/code_map.npy`` and refuse a different one.

    Only codecs with an explicit map (``bit_order=frequency`` or a ``.npy`` map) have one. The map
    is written on first use (``write``) and compared afterwards: a frequency map rebuilt from
    changed rows would silently decode the model's bits into other tokens.
    """
    if not isinstance(codec.permutation, IdCodeMap):
        return
    path = Path(run_dir) / CODE_MAP_FILE
    if path.exists():
        if not np.array_equal(np.load(path), codec.permutation.id_to_code):
            raise DataError(
                f"the id->code map built from the current corpus differs from the one this run was "
                f"trained with ({path}): data.source, the tokenizer or data.val_fraction changed; "
                "restore the run's data settings (its config.json) or start a new --run-dir"
            )
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, codec.permutation.id_to_code)
        tmp.replace(path)


def document_summary(stats: DatasetStats) -> str:
    """One line: documents read out of the source's records, and what was skipped or split."""
    notes = [f"{n:,} {what}" for n, what in ((stats.skipped_empty, "empty skipped"),
                                             (stats.skipped_bad_utf8, "bad UTF-8 skipped"),
                                             (stats.split_documents, "long ones tokenised in pieces"))
             if n]
    return (f"{stats.documents:,} read from {stats.records:,} records"
            + (f" ({'; '.join(notes)})" if notes else ""))


def stats_dict(stats: DatasetStats) -> dict:
    """Stats plus the derived numbers, JSON-ready."""
    return {**dataclasses.asdict(stats), "bits_per_row": stats.bits_per_row,
            "invalid_code_headroom": stats.invalid_code_headroom}


def dataset_stats(cfg: DataConfig, seq_tokens: int, *, progress: bool = False) -> DatasetStats:
    """Statistics of the packed corpus (builds the cache if needed)."""
    return build_corpus_rows(cfg, seq_tokens, progress=progress).stats
