"""What a row builder returns: the packed rows of a corpus with their statistics and text pipeline.

``bitgen.data.corpus`` builds them from text sources, ``bitgen.data.sudoku_corpus`` from the
generated Sudoku set; training, ``bitgen data`` and evaluation read only this shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from bitgen.codecs import BitCodec
from bitgen.textcodec import TextCodec
from bitgen.tokenizers import CodeTokenizer


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
    skipped_empty: int
    split_documents: int  # documents longer than data.max_document_chars, tokenised in pieces
    records: int  # raw records (lines, rows) read from the source
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

    rows: np.ndarray  # [N, T] uint8/uint16/uint32 (a read-only memmap of the cache)
    tokenizer: Tokenizer
    codec: BitCodec
    stats: DatasetStats
    code_tokenizer: CodeTokenizer | None = None
    source_hash_seconds: float = 0.0  # time spent hashing the source to key the cache
    # Leading tokens of every row that are given, not generated (Sudoku: BOS puzzle BOS = 91).
    # Their bits are each batch's "cond_mask": conditional training. 0 = unconditional rows.
    prompt_tokens: int = 0

    @property
    def train_rows(self) -> np.ndarray:
        return self.rows[: self.stats.train_rows]

    @property
    def val_rows(self) -> np.ndarray:
        return self.rows[self.stats.train_rows:]

    @property
    def text_codec(self) -> TextCodec:
        """The tokenizer, code tokenizer and codec as one text <-> bits pipeline."""
        return TextCodec(self.tokenizer, self.codec, self.code_tokenizer)
