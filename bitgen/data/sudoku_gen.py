"""Sudoku puzzles with exactly one solution, generated deterministically from a seed.

A grid is 81 cells in row-major order, values 0-9 (0 = blank). The generator:

1. fills a complete valid grid: the three diagonal boxes get random permutations of 1-9 (they
   share no row, column or box), the rest is completed by a randomised backtracking search;
2. removes clues in a random cell order, keeping a removal only when the puzzle still has exactly
   one solution, until the clue count of the difficulty is reached (a dead end draws a new grid).

Uniqueness after removing clue ``v`` at cell ``c`` from a puzzle whose only solution is ``S``:
another solution must differ from ``S`` at ``c`` (else it solves the previous puzzle, so equals
``S``). So the check is "is there a solution with ``c != v``", skipped outright when the remaining
clues already force ``v`` at ``c`` (the peers of ``c`` hold the other eight digits).

The search (``count_solutions``) is depth-first over bitmasks of the digits each row, column and
box uses, always branching on a blank with the fewest candidates (minimum remaining values).

Randomness: example ``k`` of stream ``tag`` draws from ``numpy.random.Generator(PCG64(
SeedSequence([seed, tag, k, attempt])))`` (attempts past 0 replace a dead end or a duplicate);
nothing reads a global RNG. Bump ``GENERATOR_VERSION`` whenever the output for a seed
changes (it keys the on-disk cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from bitgen.errors import BitgenError

GENERATOR_VERSION = 1
DIFFICULTIES = ("easy", "medium", "hard")
CLUES = {"easy": 40, "medium": 35, "hard": 30}
EQUAL_MIX = MappingProxyType({"easy": 1.0, "medium": 1.0, "hard": 1.0})
ALL_DIGITS = 0x1FF  # bit d-1 set = digit d allowed
_ROW = [c // 9 for c in range(81)]
_COL = [c % 9 for c in range(81)]
_BOX = [(c // 27) * 3 + (c % 9) // 3 for c in range(81)]
_POPCOUNT = [bin(m).count("1") for m in range(512)]
_DIGITS_OF = [[d + 1 for d in range(9) if m >> d & 1] for m in range(512)]
_MAX_ATTEMPTS = 1000  # dead ends are rare: none in 300 grids at 30 clues; duplicates rarer still


class SudokuError(BitgenError, ValueError):
    """Sudoku arrays or settings of the wrong shape or range."""


class _Search:
    """Used-digit bitmasks of one partly filled grid; ``count`` enumerates its completions."""

    def __init__(self, grid) -> None:
        self.grid = [int(v) for v in grid]
        self.rows, self.cols, self.boxes = [0] * 9, [0] * 9, [0] * 9
        self.valid = True
        for c, v in enumerate(self.grid):
            if v:
                bit = 1 << (v - 1)
                if (self.rows[_ROW[c]] | self.cols[_COL[c]] | self.boxes[_BOX[c]]) & bit:
                    self.valid = False
                self.place(c, v)

    def place(self, c: int, v: int) -> None:
        bit = 1 << (v - 1)
        self.grid[c] = v
        self.rows[_ROW[c]] |= bit
        self.cols[_COL[c]] |= bit
        self.boxes[_BOX[c]] |= bit

    def unplace(self, c: int, v: int) -> None:
        bit = ~(1 << (v - 1))
        self.grid[c] = 0
        self.rows[_ROW[c]] &= bit
        self.cols[_COL[c]] &= bit
        self.boxes[_BOX[c]] &= bit

    def candidates(self, c: int) -> int:
        return ALL_DIGITS & ~(self.rows[_ROW[c]] | self.cols[_COL[c]] | self.boxes[_BOX[c]])

    def _most_constrained(self, banned: dict[int, int]) -> tuple[int, int]:
        """(cell, candidate mask) of a blank with the fewest candidates; (-1, 0) when none is blank."""
        best, best_mask, best_n = -1, 0, 10
        grid, rows, cols, boxes = self.grid, self.rows, self.cols, self.boxes
        for c in range(81):
            if grid[c]:
                continue
            mask = ALL_DIGITS & ~(rows[_ROW[c]] | cols[_COL[c]] | boxes[_BOX[c]] | banned.get(c, 0))
            n = _POPCOUNT[mask]
            if n < best_n:
                best, best_mask, best_n = c, mask, n
                if n <= 1:
                    break
        return best, best_mask

    def count(self, limit: int, banned: dict[int, int], order=None, found=None) -> int:
        """Completions of the grid, counting stops at ``limit``. ``banned`` maps a cell to digits
        (bitmask) it may not take; ``order(digits)`` reorders the branches (random fills);
        ``found`` (a list) receives the first completion."""
        c, mask = self._most_constrained(banned)
        if c < 0:
            if found is not None and not found:
                found.append(list(self.grid))
            return 1
        digits = _DIGITS_OF[mask] if order is None else order(_DIGITS_OF[mask])
        total = 0
        for v in digits:
            self.place(c, v)
            total += self.count(limit - total, banned, order, found)
            self.unplace(c, v)
            if total >= limit:
                break
        return total


def count_solutions(grid, limit: int = 2) -> int:
    """Number of solutions of ``grid`` [81] (0 = blank), counted up to ``limit`` (0 if the clues
    already clash)."""
    search = _Search(grid)
    return search.count(limit, {}) if search.valid else 0


def solve(grid) -> np.ndarray | None:
    """One solution of ``grid`` [81] as uint8 [81], or None when it has none."""
    search, found = _Search(grid), []
    if search.valid:
        search.count(1, {}, found=found)
    return np.asarray(found[0], np.uint8) if found else None


def random_full_grid(rng: np.random.Generator) -> np.ndarray:
    """A complete valid grid, uint8 [81], drawn with ``rng``."""
    grid = [0] * 81
    for box in (0, 4, 8):
        r0, c0 = (box // 3) * 3, (box % 3) * 3
        cells = [(r0 + i) * 9 + c0 + j for i in range(3) for j in range(3)]
        for c, v in zip(cells, rng.permutation(9) + 1):
            grid[c] = int(v)
    found: list = []
    _Search(grid).count(1, {}, order=lambda ds: [ds[i] for i in rng.permutation(len(ds))],
                        found=found)
    return np.asarray(found[0], np.uint8)  # three filled diagonal boxes always complete


def _still_unique(search: _Search, c: int, v: int) -> bool:
    """After blanking ``c`` (solution value ``v``): does the puzzle keep exactly one solution?"""
    if _POPCOUNT[search.candidates(c)] == 1:  # the other clues force v at c
        return True
    return search.count(1, {c: 1 << (v - 1)}) == 0


def make_puzzle(rng: np.random.Generator, n_clues: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(puzzle, solution), uint8 [81] each, with exactly ``n_clues`` clues and one solution; None
    when clue removal reached a dead end (every remaining clue is needed) above ``n_clues``."""
    solution = random_full_grid(rng)
    search, clues = _Search(solution), 81
    for c in rng.permutation(81):
        if clues == n_clues:
            break
        c, v = int(c), search.grid[int(c)]
        search.unplace(c, v)
        if _still_unique(search, c, v):
            clues -= 1
        else:
            search.place(c, v)
    if clues != n_clues:
        return None
    return np.asarray(search.grid, np.uint8), solution


def _generator(*entropy: int) -> np.random.Generator:
    """A PCG64 generator seeded with the integers ``entropy`` (never the global RNG)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


def difficulty_counts(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` examples by the weights ``mix`` (largest remainders, ties to the easier level)."""
    unknown = set(mix) - set(DIFFICULTIES)
    if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise SudokuError(f"difficulty mix {dict(mix)} must give non-negative weights to some of "
                         f"{DIFFICULTIES}, not all zero")
    total = float(sum(mix.values()))
    exact = {d: n * mix.get(d, 0.0) / total for d in DIFFICULTIES}
    counts = {d: int(exact[d]) for d in DIFFICULTIES}
    by_remainder = sorted(DIFFICULTIES, key=lambda d: -(exact[d] - counts[d]))
    for d in by_remainder[: n - sum(counts.values())]:
        counts[d] += 1
    return counts


def generate_split(seed: int, n: int, mix: Mapping[str, float] = EQUAL_MIX, *, tag: int = 0,
                   exclude: set[bytes] | None = None, on_example: Callable[[], object] | None = None):
    """``n`` puzzles of stream ``tag`` for ``seed``: (puzzles [n,81] uint8, solutions [n,81] uint8,
    difficulty [n] uint8 index into ``DIFFICULTIES``).

    No two examples share a solution grid (so no two share a puzzle), nor with any solution in
    ``exclude`` (the ``bytes`` of uint8 [81] grids); ``exclude`` is updated with the new ones, so
    passing one set to several calls deduplicates across splits. Difficulties follow ``mix``
    (``difficulty_counts``), in an order shuffled by the seed. ``on_example()`` is called after
    each example (a progress bar's ``update``); it does not change the output.
    """
    counts = difficulty_counts(n, mix)
    levels = np.repeat(np.arange(len(DIFFICULTIES), dtype=np.uint8),
                       [counts[d] for d in DIFFICULTIES])
    levels = _generator(seed, tag, n).permutation(levels)
    seen = set() if exclude is None else exclude
    puzzles, solutions = np.zeros((n, 81), np.uint8), np.zeros((n, 81), np.uint8)
    for k, level in enumerate(levels):
        for attempt in range(_MAX_ATTEMPTS):
            made = make_puzzle(_generator(seed, tag, k, attempt), CLUES[DIFFICULTIES[level]])
            if made is not None and made[1].tobytes() not in seen:
                break
        else:
            raise RuntimeError(f"no new puzzle after {_MAX_ATTEMPTS} attempts "
                               f"(seed {seed}, example {k})")
        puzzles[k], solutions[k] = made
        seen.add(made[1].tobytes())
        if on_example is not None:
            on_example()
    return puzzles, solutions, levels
