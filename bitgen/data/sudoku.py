"""Sudoku as token rows (issue 12): the encoding, the prompt masks and the cached data set.

Ids (12; 4-bit codes, raw binary, MSB first, so codes 12-15 name no token)::

    0      blank cell (puzzles only)        10  row separator ``SEP``
    1-9    the digit                        11  ``BOS``

A grid [81] (row-major, 0 = blank) is written as its nine rows of nine digits with ``SEP`` between
rows: 81 + 8 = 89 tokens. One example is ``[BOS] puzzle [BOS] solution``: 180 tokens, 720 bits.
The prompt is the first 91 tokens (364 bits, ``BOS`` + puzzle + ``BOS``); the model generates the
last 89 (the solution). Rows hold token ids only, so any family (CoBit with a clamped prompt, AR
continuing the prompt) reads the same arrays.

``sudoku_rows(cache_dir, seed, ...)`` generates 48k train + 2k validation examples on first use
(about 100 s on one CPU core) and reuses them after: the rows cache of ``bitgen.data.cache``, keyed
by the generator version, seed, sizes and difficulty mix. The clue count of a row's puzzle
(40 / 35 / 30) is its difficulty.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitgen.codecs import BitCodec
from bitgen.data.cache import cache_dir_for, load_cached_rows, write_cached_rows
from bitgen.data.sudoku_gen import (
    CLUES,
    DIFFICULTIES,
    EQUAL_MIX,
    GENERATOR_VERSION,
    SudokuError,
    difficulty_counts,
    generate_split,
)

BLANK, SEP, BOS = 0, 10, 11
VOCAB_SIZE, CODE_WIDTH = 12, 4
GRID_TOKENS = 89  # 81 cells + 8 separators
PROMPT_TOKENS = 1 + GRID_TOKENS + 1  # BOS puzzle BOS
ROW_TOKENS = PROMPT_TOKENS + GRID_TOKENS  # 180
ROW_BITS = ROW_TOKENS * CODE_WIDTH  # 720
# Codes >= 12 are invalid; the metrics read codes before any policy, so ``modulo`` only matters
# for showing a sample as text.
SUDOKU_CODEC = BitCodec(vocab_size=VOCAB_SIZE, width=CODE_WIDTH)
# Position of each of the 81 cells inside an 89-token grid (cell r*9+c -> r*10+c).
CELL_POSITIONS = np.array([r * 10 + c for r in range(9) for c in range(9)])
SEP_POSITIONS = np.array([r * 10 + 9 for r in range(8)])
SOLUTION_START = PROMPT_TOKENS
DEFAULT_SEED = 12
TRAIN_SIZE, VALID_SIZE = 48_000, 2_000
_TEXT = {BLANK: ".", SEP: "|", BOS: "^"}


def grid_to_tokens(grids) -> np.ndarray:
    """Grids [..., 81] (values 0-9) -> token ids uint8 [..., 89] (rows joined by ``SEP``)."""
    grids = np.asarray(grids)
    if grids.shape[-1:] != (81,) or grids.size and (grids.min() < 0 or grids.max() > 9):
        raise SudokuError(f"grids must be [..., 81] with values 0-9, got shape {grids.shape}")
    tokens = np.full(grids.shape[:-1] + (GRID_TOKENS,), SEP, np.uint8)
    tokens[..., CELL_POSITIONS] = grids
    return tokens


def tokens_to_grid(tokens) -> np.ndarray:
    """Token ids [..., 89] -> the 81 cell tokens [..., 81] (separator slots dropped, values kept)."""
    tokens = np.asarray(tokens)
    if tokens.shape[-1:] != (GRID_TOKENS,):
        raise SudokuError(f"a grid is {GRID_TOKENS} tokens, got shape {tokens.shape}")
    return tokens[..., CELL_POSITIONS]


def encode_rows(puzzles, solutions) -> np.ndarray:
    """Puzzles and solutions [N, 81] -> token rows uint8 [N, 180]: ``BOS puzzle BOS solution``."""
    puzzles, solutions = np.asarray(puzzles), np.asarray(solutions)
    if puzzles.shape != solutions.shape:
        raise SudokuError(f"puzzles {puzzles.shape} and solutions {solutions.shape} differ in shape")
    bos = np.full(puzzles.shape[:-1] + (1,), BOS, np.uint8)
    return np.concatenate([bos, grid_to_tokens(puzzles), bos, grid_to_tokens(solutions)], axis=-1)


def split_rows(rows) -> tuple[np.ndarray, np.ndarray]:
    """Token rows [..., 180] -> (puzzles [..., 81], solutions [..., 81]) read from the cell slots."""
    rows = np.asarray(rows)
    if rows.shape[-1:] != (ROW_TOKENS,):
        raise SudokuError(f"a Sudoku row is {ROW_TOKENS} tokens, got shape {rows.shape}")
    return tokens_to_grid(rows[..., 1:1 + GRID_TOKENS]), tokens_to_grid(rows[..., SOLUTION_START:])


def rows_to_bits(rows) -> np.ndarray:
    """Token rows [..., 180] -> bits uint8 [..., 720] (``SUDOKU_CODEC``)."""
    return SUDOKU_CODEC.ids_to_bits(np.asarray(rows))


def bits_to_codes(bits) -> np.ndarray:
    """Bits [..., 720] (floats thresholded at 0.5) -> codes uint32 [..., 180]; 12-15 are invalid."""
    return np.asarray(SUDOKU_CODEC.bits_to_codes(np.asarray(bits)))


def prompt_token_mask(n: int) -> np.ndarray:
    """bool [n, 180]: True on the 91 prompt tokens (``BOS puzzle BOS``), False on the solution."""
    mask = np.zeros((n, ROW_TOKENS), bool)
    mask[:, :PROMPT_TOKENS] = True
    return mask


def prompt_bit_mask(n: int) -> np.ndarray:
    """bool [n, 720]: True on the 364 bits of the prompt tokens; for ``Cond.clamped(mask, bits)``."""
    return np.repeat(prompt_token_mask(n), CODE_WIDTH, axis=-1)


def prompt_ids(puzzles) -> np.ndarray:
    """Puzzles [N, 81] -> the prompt token ids uint8 [N, 91] (``BOS puzzle BOS``): what an
    autoregressive model continues."""
    puzzles = np.asarray(puzzles)
    bos = np.full(puzzles.shape[:-1] + (1,), BOS, np.uint8)
    return np.concatenate([bos, grid_to_tokens(puzzles), bos], axis=-1)


def prompt_bits(puzzles) -> np.ndarray:
    """Puzzles [N, 81] -> bits uint8 [N, 720]: the prompt's codes, zeros after them. With
    ``prompt_bit_mask`` it is the ``Cond.clamped(mask, bits)`` of a bit-diffusion model."""
    ids = prompt_ids(puzzles)
    bits = np.zeros(ids.shape[:-1] + (ROW_BITS,), np.uint8)
    bits[..., :PROMPT_TOKENS * CODE_WIDTH] = SUDOKU_CODEC.ids_to_bits(ids)
    return bits


def clue_difficulty(puzzles) -> np.ndarray:
    """Puzzles [N, 81] -> difficulty index [N] into ``DIFFICULTIES`` by clue count, -1 for a count
    that is none of 40 / 35 / 30."""
    clues = (np.asarray(puzzles) != BLANK).sum(-1)
    out = np.full(clues.shape, -1, np.int8)
    for i, name in enumerate(DIFFICULTIES):
        out[clues == CLUES[name]] = i
    return out


def format_grid(grid) -> str:
    """One grid [81] (or its 89 tokens) as nine lines with box rules; blanks as ``.``."""
    grid = np.asarray(grid)
    cells = tokens_to_grid(grid) if grid.shape == (GRID_TOKENS,) else grid
    if cells.shape != (81,):
        raise SudokuError(f"format_grid takes one grid of 81 cells or {GRID_TOKENS} tokens, got {grid.shape}")
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        row = [_TEXT.get(int(v), str(int(v))) if int(v) <= 9 else "?" for v in cells[r * 9:(r + 1) * 9]]
        lines.append(" | ".join(" ".join(row[i:i + 3]) for i in (0, 3, 6)))
    return "\n".join(lines)


def format_row(row) -> str:
    """One token row [180] as text: ``^`` BOS, ``|`` separator, ``.`` blank, ``?`` an invalid code."""
    return "".join(_TEXT.get(int(v), str(int(v)) if int(v) <= 9 else "?") for v in np.asarray(row))


@dataclass(frozen=True)
class SudokuRows:
    """The cached data set: token rows uint8 [N, 180] of each split, and the cache sidecar.

    status: ``reused``, or ``built (<why>)`` when this call generated the rows.
    """

    train: np.ndarray
    valid: np.ndarray
    meta: dict
    path: Path
    status: str = "reused"


def sudoku_rows(cache_dir: str | Path, seed: int = DEFAULT_SEED, *, n_train: int = TRAIN_SIZE,
                n_valid: int = VALID_SIZE, mix: Mapping[str, float] = EQUAL_MIX,
                rebuild: bool = False, progress: bool = False) -> SudokuRows:
    """Train and validation rows for ``seed``: built on first use under ``cache_dir`` (atomic
    write), reused after. Validation is generated first; the two splits share no solution grid.
    ``progress``: a bar over the puzzles while they are generated."""
    difficulty_counts(n_train, mix)  # a bad mix fails before anything is written
    mix = {d: float(w) for d, w in mix.items() if w}
    fingerprint = {"generator": GENERATOR_VERSION, "seed": int(seed), "n_train": int(n_train),
                   "n_valid": int(n_valid), "mix": mix, "row_tokens": ROW_TOKENS}
    path = cache_dir_for(cache_dir, f"sudoku-s{seed}-{n_train}-{n_valid}", fingerprint)
    cached, status = (None, "rebuild requested") if rebuild else load_cached_rows(path, fingerprint)
    if cached is None:
        started, stats = time.perf_counter(), {}

        def row_batches() -> Iterator[np.ndarray]:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=n_valid + n_train, desc="generating Sudoku puzzles", unit="puzzle",
                           delay=1.0)
            seen: set[bytes] = set()
            try:
                for split, tag, n in (("valid", 1, n_valid), ("train", 0, n_train)):
                    puzzles, solutions, levels = generate_split(
                        seed, n, mix, tag=tag, exclude=seen,
                        on_example=None if bar is None else bar.update)
                    stats[split] = dict(zip(DIFFICULTIES, np.bincount(levels, minlength=3).tolist()))
                    yield encode_rows(puzzles, solutions)
            finally:
                if bar is not None:
                    bar.close()

        def build_stats() -> dict:
            return {**stats, "seconds": round(time.perf_counter() - started, 1)}

        cached = write_cached_rows(path, fingerprint, row_batches(), seq_tokens=ROW_TOKENS,
                                   dtype=np.uint8, stats_fn=build_stats)
        status = f"built ({status})"
    rows = np.asarray(cached.rows)
    return SudokuRows(train=rows[n_valid:], valid=rows[:n_valid], meta=cached.meta, path=cached.path,
                      status=status)
