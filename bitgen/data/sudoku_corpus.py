"""``data.source = "sudoku"``: the generated Sudoku set as a run's packed rows and text pipeline.

Rows are ``[BOS] puzzle [BOS] solution`` (``bitgen.data.sudoku``): 180 tokens of 4-bit raw codes,
so a Sudoku run needs ``model.seq_tokens=180`` and ``model.patch_size=4``. Train = the 48k train
split, validation = the 2k valid split, generated from seed 12 whatever ``data.seed`` (which only
shuffles batches). The first 91 tokens of every row are given (``PackedRows.prompt_tokens``), so
training batches carry their bits as ``cond_mask``: CoBit trains conditionally, the AR baseline
scores the solution tokens only.

The text pipeline is a character-level ``tokenizers`` WordLevel model over the 12 symbols
(``.`` blank (``0`` is read as ``.``), ``1``-``9``, ``|`` row separator, ``^`` BOS; whitespace is
ignored), so ``bitgen sample``, run folders (``tokenizer/``) and ``load_model`` work as for text.
``data.tokenizer``, ``data.vocab_size``, ``data.packing``, ``data.code_policy`` and
``data.val_fraction`` do not apply and are ignored; settings that would change the codes
(``data.bit_order``, ``data.code_tokenizer``) are refused.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from bitgen.config import DataConfig
from bitgen.data import sudoku
from bitgen.data.rows import DatasetStats, PackedRows
from bitgen.data.sources import DataError
from bitgen.errors import ConfigError

SUDOKU_SOURCE = "sudoku"
# Id -> its character; ids follow ``bitgen.data.sudoku`` (0 blank, 1-9 digits, 10 SEP, 11 BOS).
SYMBOLS = (".", "1", "2", "3", "4", "5", "6", "7", "8", "9", "|", "^")


def sudoku_tokenizer() -> Tokenizer:
    """One character per token over ``SYMBOLS`` (id = index); decoding joins them unspaced."""
    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate(SYMBOLS)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Replace("0", ".")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def check_sudoku_settings(cfg: DataConfig, seq_tokens: int) -> None:
    """Refuse model/data settings a Sudoku run cannot use (one line naming the fix)."""
    if seq_tokens != sudoku.ROW_TOKENS:
        raise ConfigError(f"data.source=sudoku rows are {sudoku.ROW_TOKENS} tokens but "
                          f"model.seq_tokens={seq_tokens}; set model.seq_tokens={sudoku.ROW_TOKENS}")
    if cfg.bit_order != "raw" or cfg.code_tokenizer:
        raise ConfigError(f"data.source=sudoku uses its own 4-bit raw codes; unset data.bit_order="
                          f"{cfg.bit_order!r} / data.code_tokenizer={cfg.code_tokenizer!r} "
                          "(bit_order=raw, code_tokenizer='')")


def sudoku_packed_rows(cfg: DataConfig, seq_tokens: int, *, progress: bool = False,
                       rebuild: bool = False) -> PackedRows:
    """The Sudoku set as ``PackedRows`` [50k, 180] uint8 (train rows first, then validation),
    generated under ``cfg.cache_dir`` on first use (about 100 s) and reused after.

    The split sizes are read from ``bitgen.data.sudoku`` (``TRAIN_SIZE``, ``VALID_SIZE``) at call
    time, so tests can shrink them.
    """
    check_sudoku_settings(cfg, seq_tokens)
    built = sudoku.sudoku_rows(cfg.cache_dir, sudoku.DEFAULT_SEED, n_train=sudoku.TRAIN_SIZE,
                               n_valid=sudoku.VALID_SIZE, rebuild=rebuild, progress=progress)
    n_train, n_valid = len(built.train), len(built.valid)
    if n_train == 0:
        raise DataError("the Sudoku set has no training rows; regenerate it with --rebuild")
    rows = np.concatenate([built.train, built.valid])
    n = len(rows)
    stats = DatasetStats(source=SUDOKU_SOURCE, documents=n, tokens=n * sudoku.ROW_TOKENS, rows=n,
                         seq_tokens=sudoku.ROW_TOKENS, width=sudoku.CODE_WIDTH,
                         vocab_size=sudoku.VOCAB_SIZE, dropped_tail_tokens=0, skipped_bad_utf8=0,
                         skipped_empty=0, split_documents=0, records=n, train_rows=n_train,
                         val_rows=n_valid, cache_path=str(built.path), cache_status=built.status)
    return PackedRows(rows, sudoku_tokenizer(), sudoku.SUDOKU_CODEC, stats,
                      prompt_tokens=sudoku.PROMPT_TOKENS)
