"""Sudoku metrics (issue 12) and the ``--puzzles FILE`` format.

Generated rows are read as codes [N, 180] (from bits with ``bitgen.data.sudoku.bits_to_codes``),
before any invalid-code policy: codes 12-15 name no token and count as wrong. Only the 89 solution
tokens (positions 91..179) are scored; the prompt is the caller's (clamped) input.

Per difficulty (clue count 40 / 35 / 30; any other count is ``other``) and over ``all``:

* ``exact_match``: the 89 solution tokens equal the true ones (separators included);
* ``cell_accuracy``: fraction of the 81 cells equal to the true digit;
* ``solved``: the predicted cells form a valid Sudoku that keeps every clue (needs no solution; for
  a puzzle with one solution it equals an exact match of the cells);
* ``invalid_code_rate``: fraction of the 89 solution codes that are 12-15;
* ``separator_error_rate``: fraction of the 8 separator slots that do not hold ``SEP``.

Puzzle files: one puzzle per line, 81 characters 0-9 (0 = blank); optionally a space and its
solution, 81 characters 1-9, on every line or on none. Blank lines are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitgen.data.sudoku import (
    BLANK,
    CELL_POSITIONS,
    ROW_TOKENS,
    SEP,
    SEP_POSITIONS,
    SOLUTION_START,
    VOCAB_SIZE,
    bits_to_codes,
    clue_difficulty,
    grid_to_tokens,
)
from bitgen.data.sudoku_gen import DIFFICULTIES, SudokuError
from bitgen.errors import BitgenError
from bitgen.files import write_atomic

GROUPS = (*DIFFICULTIES, "other", "all")


class PuzzleFileError(BitgenError, ValueError):
    """A puzzle file line that is not in the ``--puzzles`` format."""


@dataclass(frozen=True)
class SudokuScore:
    """Metrics of one group of puzzles (fractions in [0, 1]; None where solutions are unknown)."""

    n: int
    exact_match: float | None
    cell_accuracy: float | None
    solved: float
    invalid_code_rate: float
    separator_error_rate: float


def solution_cells(codes) -> np.ndarray:
    """Codes [N, 180] -> the 81 predicted cell codes [N, 81] of the solution (may hold 0 or 10-15)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != ROW_TOKENS:
        raise SudokuError(f"generated rows must be [N, {ROW_TOKENS}] codes, got shape {codes.shape}")
    return codes[:, SOLUTION_START + CELL_POSITIONS]


def is_solved(grids, puzzles) -> np.ndarray:
    """bool [N]: ``grids`` [N, 81] is a complete valid Sudoku (every row, column and box holds 1-9
    once) that agrees with every clue of ``puzzles`` [N, 81]."""
    grids, puzzles = np.asarray(grids, np.int64), np.asarray(puzzles, np.int64)
    board = grids.reshape(-1, 9, 9)
    boxes = board.reshape(-1, 3, 3, 3, 3).transpose(0, 1, 3, 2, 4).reshape(-1, 9, 9)
    digits = np.arange(1, 10)
    units_ok = [np.all(np.sort(unit, axis=-1) == digits, axis=(-2, -1))
                for unit in (board, board.transpose(0, 2, 1), boxes)]
    keeps_clues = np.all((puzzles == BLANK) | (grids == puzzles), axis=-1)
    return units_ok[0] & units_ok[1] & units_ok[2] & keeps_clues


def score(codes, puzzles, solutions=None) -> dict[str, SudokuScore]:
    """Metrics of generated rows ``codes`` [N, 180] for ``puzzles`` [N, 81] and, when known, their
    ``solutions`` [N, 81]; keyed by group (``GROUPS``, empty groups left out, ``all`` always)."""
    codes, puzzles = np.asarray(codes), np.asarray(puzzles)
    cells = solution_cells(codes)
    if puzzles.shape != cells.shape:
        raise SudokuError(f"puzzles {puzzles.shape} do not match {len(codes)} generated rows")
    suffix = codes[:, SOLUTION_START:]
    per_row = {
        "solved": is_solved(cells, puzzles).astype(float),
        "invalid_code_rate": (suffix >= VOCAB_SIZE).mean(-1),
        "separator_error_rate": (suffix[:, SEP_POSITIONS] != SEP).mean(-1),
    }
    if solutions is not None:
        solutions = np.asarray(solutions)
        if solutions.shape != puzzles.shape:
            raise SudokuError(f"solutions {solutions.shape} do not match puzzles {puzzles.shape}")
        per_row["exact_match"] = np.all(suffix == grid_to_tokens(solutions), -1).astype(float)
        per_row["cell_accuracy"] = (cells == solutions).mean(-1)
    level = clue_difficulty(puzzles)
    members = {name: level == i for i, name in enumerate(DIFFICULTIES)}
    members["other"] = level < 0
    members["all"] = np.ones(len(codes), bool)
    out = {}
    for group in GROUPS:
        rows = members[group]
        if group != "all" and not rows.any():
            continue
        mean = {k: float(v[rows].mean()) if rows.any() else float("nan") for k, v in per_row.items()}
        out[group] = SudokuScore(n=int(rows.sum()), exact_match=mean.get("exact_match"),
                                 cell_accuracy=mean.get("cell_accuracy"), solved=mean["solved"],
                                 invalid_code_rate=mean["invalid_code_rate"],
                                 separator_error_rate=mean["separator_error_rate"])
    return out


def score_bits(bits, puzzles, solutions=None) -> dict[str, SudokuScore]:
    """``score`` of generated bits [N, 720] (floats thresholded at 0.5)."""
    return score(bits_to_codes(bits), puzzles, solutions)


def format_scores(scores: dict[str, SudokuScore]) -> str:
    """A table of ``score``'s result, one line per group, percentages."""
    def pct(x):
        return "     -" if x is None else f"{100 * x:6.1f}"

    lines = ["group        n  exact%  cell%  solved%  invalid%  sep-err%"]
    for group, s in scores.items():
        lines.append(f"{group:<8}{s.n:>6}  {pct(s.exact_match)} {pct(s.cell_accuracy)}  "
                     f"{pct(s.solved)}    {pct(s.invalid_code_rate)}    {pct(s.separator_error_rate)}")
    return "\n".join(lines)


def _parse_grid(text: str, where: str, *, blanks: bool) -> np.ndarray:
    allowed = "0123456789" if blanks else "123456789"
    what = "puzzle" if blanks else "solution"
    if len(text) != 81:
        raise PuzzleFileError(f"{where}: the {what} has {len(text)} characters, not 81; write the "
                              f"grid row by row as 81 characters {allowed[0]}-9")
    bad = next((i for i, ch in enumerate(text) if ch not in allowed), None)
    if bad is not None:
        raise PuzzleFileError(f"{where}: {what} character {bad + 1} is {text[bad]!r}, not one of "
                              f"{allowed[0]}-9{' (0 = blank)' if blanks else ''}")
    return np.frombuffer(text.encode(), np.uint8) - ord("0")


def _repeat(grid: np.ndarray) -> str | None:
    """``row 3 repeats 5`` for the first row, column or box of ``grid`` [81] that holds a digit
    twice (blanks ignored), else None."""
    board = grid.reshape(9, 9)
    boxes = board.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    for kind, units in (("row", board), ("column", board.T), ("box", boxes)):
        for i, unit in enumerate(units):
            counts = np.bincount(unit, minlength=10)[1:]
            if counts.max() > 1:
                return f"{kind} {i + 1} repeats {int(counts.argmax()) + 1}"
    return None


def read_puzzles(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Puzzles [N, 81] uint8 and solutions [N, 81] uint8 (None when the file gives none) from a
    ``--puzzles`` file; a malformed line raises ``PuzzleFileError`` naming the line."""
    path = Path(path)
    puzzles, solutions, first_kind = [], [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where, fields = f"{path}:{number}", line.split()
        if len(fields) > 2:
            raise PuzzleFileError(f"{where}: {len(fields)} fields; a line is a puzzle, optionally "
                                  "followed by one space and its solution")
        kind = "with" if len(fields) == 2 else "without"
        if first_kind is None:
            first_kind = (kind, number)
        elif kind != first_kind[0]:
            raise PuzzleFileError(f"{where}: a puzzle {kind} a solution, but line {first_kind[1]} is "
                                  f"{first_kind[0]} one; give solutions on every line or on none")
        puzzle = _parse_grid(fields[0], where, blanks=True)
        if (repeat := _repeat(puzzle)) is not None:
            raise PuzzleFileError(f"{where}: the puzzle's clues clash ({repeat}); fix the puzzle")
        puzzles.append(puzzle)
        if len(fields) == 2:
            solution = _parse_grid(fields[1], where, blanks=False)
            if (repeat := _repeat(solution)) is not None:
                raise PuzzleFileError(f"{where}: the solution is not a valid Sudoku ({repeat}); "
                                      "fix the solution")
            changed = np.flatnonzero((puzzle != 0) & (puzzle != solution))
            if changed.size:
                r, c = divmod(int(changed[0]), 9)
                raise PuzzleFileError(f"{where}: the solution changes the clue at row {r + 1}, "
                                      f"column {c + 1}; fix the puzzle or the solution")
            solutions.append(solution)
    if not puzzles:
        raise PuzzleFileError(f"{path}: no puzzles; write one per line as 81 digits (0 = blank)")
    return np.stack(puzzles), (np.stack(solutions) if solutions else None)


def grid_text(cells) -> str:
    """Cell codes [81] as 81 characters: digits 0-9 as themselves, any other code as ``?``."""
    return "".join(str(int(v)) if int(v) <= 9 else "?" for v in np.asarray(cells))


def write_predictions(path: str | Path, puzzles, codes) -> None:
    """Write ``puzzle prediction`` per line (81 characters each, ``grid_text``), atomically, for
    ``puzzles`` [N, 81] and generated rows ``codes`` [N, 180]; a solved line reads back with
    ``read_puzzles``."""
    cells = solution_cells(codes)
    puzzles = np.asarray(puzzles)
    if puzzles.shape != cells.shape:
        raise SudokuError(f"puzzles {puzzles.shape} do not match {len(cells)} generated rows")
    write_atomic(path, "".join(f"{grid_text(p)} {grid_text(c)}\n" for p, c in zip(puzzles, cells)))

