"""Sudoku benchmark: generator (checked by an independent solver), encoding, masks, metrics, files."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.data.sudoku import (
    BOS,
    CODE_WIDTH,
    PROMPT_TOKENS,
    ROW_BITS,
    ROW_TOKENS,
    SEP,
    SUDOKU_CODEC,
    bits_to_codes,
    clue_difficulty,
    encode_rows,
    format_grid,
    format_row,
    grid_to_tokens,
    prompt_bit_mask,
    prompt_bits,
    prompt_ids,
    prompt_token_mask,
    rows_to_bits,
    split_rows,
    sudoku_rows,
    tokens_to_grid,
)
from bitgen.data.sudoku_gen import (
    CLUES,
    DIFFICULTIES,
    SudokuError,
    count_solutions,
    difficulty_counts,
    generate_split,
    solve,
)
from bitgen.eval.sudoku import (
    PuzzleFileError,
    format_scores,
    is_solved,
    read_puzzles,
    score,
    score_bits,
    write_predictions,
)

PER_LEVEL = 200


# --- an independent solver: exact cover (Knuth's Algorithm X over dicts of sets) ---------------
# Each candidate (row, col, digit) covers four constraints: the cell, digit-in-row, digit-in-col,
# digit-in-box. A solution picks 81 candidates covering all 324 constraints exactly once.


def _constraints(r: int, c: int, d: int) -> list[tuple]:
    return [("cell", r, c), ("row", r, d), ("col", c, d), ("box", (r // 3) * 3 + c // 3, d)]


def exact_cover_count(puzzle, limit: int = 2) -> tuple[int, list[int] | None]:
    """(number of solutions up to ``limit``, the first one as 81 digits)."""
    choices = {(r, c, d): _constraints(r, c, d) for r in range(9) for c in range(9) for d in range(1, 10)}
    columns: dict[tuple, set] = {}
    for choice, cols in choices.items():
        for col in cols:
            columns.setdefault(col, set()).add(choice)

    def select(choice):
        removed = []
        for col in choices[choice]:
            for other in columns[col]:
                for other_col in choices[other]:
                    if other_col != col:
                        columns[other_col].discard(other)
            removed.append(columns.pop(col))
        return removed

    def deselect(choice, removed):
        for col in reversed(choices[choice]):
            columns[col] = removed.pop()
            for other in columns[col]:
                for other_col in choices[other]:
                    if other_col != col:
                        columns[other_col].add(other)

    picked, first = [], []
    for i, v in enumerate(np.asarray(puzzle)):
        if v:
            choice = (i // 9, i % 9, int(v))
            if not all(col in columns and choice in columns[col] for col in choices[choice]):
                return 0, None  # the clues clash
            select(choice)
            picked.append(choice)

    def search(limit):
        if not columns:
            if not first:
                first.append(list(picked))
            return 1
        col = min(columns, key=lambda k: len(columns[k]))
        found = 0
        for choice in list(columns[col]):
            removed = select(choice)
            picked.append(choice)
            found += search(limit - found)
            picked.pop()
            deselect(choice, removed)
            if found >= limit:
                break
        return found

    count = search(limit)
    if not first:
        return count, None
    grid = [0] * 81
    for r, c, d in first[0]:
        grid[r * 9 + c] = d
    return count, grid


@pytest.fixture(scope="module")
def sample():
    """PER_LEVEL puzzles of each difficulty from one seed."""
    return {name: generate_split(7, PER_LEVEL, {name: 1.0}) for name in DIFFICULTIES}


@pytest.mark.parametrize("name", DIFFICULTIES)
def test_every_puzzle_has_one_solution_and_its_clue_count(sample, name):
    puzzles, solutions, levels = sample[name]
    assert (levels == DIFFICULTIES.index(name)).all()
    assert ((puzzles != 0).sum(1) == CLUES[name]).all()
    for puzzle, solution in zip(puzzles, solutions):
        count, grid = exact_cover_count(puzzle)
        assert count == 1
        assert grid == solution.tolist()


def test_independent_solver_detects_several_and_no_solutions(sample):
    puzzle = sample["hard"][0][0].copy()
    puzzle[np.flatnonzero(puzzle)[:6]] = 0  # 24 clues left; for this seed, several solutions
    assert exact_cover_count(puzzle)[0] == 2 == count_solutions(puzzle)
    clash = np.zeros(81, np.uint8)
    clash[[0, 1]] = 5
    assert exact_cover_count(clash)[0] == 0 == count_solutions(clash)
    assert solve(clash) is None
    assert count_solutions(np.zeros(81, np.uint8)) == 2
    assert exact_cover_count(np.zeros(81, np.uint8))[0] == 2


def test_generation_is_deterministic_per_seed():
    a = generate_split(3, 12, {"easy": 1, "hard": 2})
    b = generate_split(3, 12, {"easy": 1, "hard": 2})
    c = generate_split(4, 12, {"easy": 1, "hard": 2})
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert a[1].tobytes() != c[1].tobytes()
    assert np.bincount(a[2], minlength=3).tolist() == [4, 0, 8]


def test_excluded_solutions_are_never_generated():
    puzzles, solutions, _ = generate_split(5, 4, {"medium": 1})
    exclude = {solutions[0].tobytes(), solutions[2].tobytes()}
    _, again, _ = generate_split(5, 4, {"medium": 1}, exclude=exclude)
    assert again[1].tobytes() == solutions[1].tobytes()  # the same draw where nothing clashed
    assert again[0].tobytes() != solutions[0].tobytes()
    assert len({s.tobytes() for s in again} | {solutions[0].tobytes(), solutions[2].tobytes()}) == 6


@given(n=st.integers(0, 1000), weights=st.lists(st.integers(0, 5), min_size=3, max_size=3))
def test_difficulty_counts_sum_to_n_and_follow_the_weights(n, weights):
    if sum(weights) == 0:
        with pytest.raises(SudokuError):
            difficulty_counts(n, dict(zip(DIFFICULTIES, weights)))
        return
    counts = difficulty_counts(n, dict(zip(DIFFICULTIES, weights)))
    assert sum(counts.values()) == n
    for name, w in zip(DIFFICULTIES, weights):
        # largest remainders: each count is the exact share rounded down or up
        assert abs(counts[name] - n * w / sum(weights)) < 1


def test_sudoku_rows_builds_once_and_splits_share_no_grid(tmp_path, monkeypatch):
    rows = sudoku_rows(tmp_path, 1, n_train=40, n_valid=10)
    assert rows.train.shape == (40, ROW_TOKENS) and rows.valid.shape == (10, ROW_TOKENS)
    solutions = np.concatenate([split_rows(rows.train)[1], split_rows(rows.valid)[1]])
    assert len({s.tobytes() for s in solutions}) == 50
    assert (clue_difficulty(split_rows(rows.train)[0]) >= 0).all()
    assert rows.meta["stats"]["valid"] == {"easy": 4, "medium": 3, "hard": 3}
    assert np.bincount(clue_difficulty(split_rows(rows.train)[0])).tolist() == [14, 13, 13]
    import bitgen.data.sudoku as module

    monkeypatch.setattr(module, "generate_split", lambda *a, **k: pytest.fail("rebuilt a cached set"))
    again = sudoku_rows(tmp_path, 1, n_train=40, n_valid=10)
    assert again.train.tobytes() == rows.train.tobytes() and again.path == rows.path


# --- encoding -------------------------------------------------------------------------------------

grids = st.lists(st.integers(0, 9), min_size=81, max_size=81).map(lambda v: np.array(v, np.uint8))


@given(puzzle=grids, solution=grids)
def test_encoding_round_trips_through_ids_and_bits(puzzle, solution):
    rows = encode_rows(puzzle[None], solution[None])
    assert rows.shape == (1, ROW_TOKENS)
    assert rows[0, 0] == BOS == rows[0, PROMPT_TOKENS - 1]
    assert (rows[0, [10, 20, 30, 40, 50, 60, 70, 80]] == SEP).all()  # after BOS, every 10th token
    assert (tokens_to_grid(grid_to_tokens(puzzle)) == puzzle).all()
    bits = rows_to_bits(rows)
    assert bits.shape == (1, ROW_BITS) and set(np.unique(bits)) <= {0, 1}
    decoded = SUDOKU_CODEC.decode(bits)
    assert (decoded.ids == rows).all() and decoded.n_invalid[0] == 0
    assert (bits_to_codes(bits.astype(np.float32)) == rows).all()
    back_puzzle, back_solution = split_rows(rows)
    assert (back_puzzle[0] == puzzle).all() and (back_solution[0] == solution).all()


def test_prompt_masks_cover_exactly_the_first_91_tokens():
    tokens, bits = prompt_token_mask(3), prompt_bit_mask(3)
    assert tokens.shape == (3, ROW_TOKENS) and bits.shape == (3, ROW_BITS)
    assert tokens[:, :PROMPT_TOKENS].all() and not tokens[:, PROMPT_TOKENS:].any()
    assert bits.sum() == 3 * PROMPT_TOKENS * CODE_WIDTH and bits[:, : PROMPT_TOKENS * CODE_WIDTH].all()
    # Mixing two rows' bits under the mask keeps the prompt tokens of one and the rest of the other.
    a = encode_rows(np.zeros((3, 81), np.uint8), np.full((3, 81), 3, np.uint8))
    b = encode_rows(np.full((3, 81), 7, np.uint8), np.full((3, 81), 9, np.uint8))
    mixed = bits_to_codes(np.where(bits, rows_to_bits(a), rows_to_bits(b)))
    assert (mixed[:, :PROMPT_TOKENS] == a[:, :PROMPT_TOKENS]).all()
    assert (mixed[:, PROMPT_TOKENS:] == b[:, PROMPT_TOKENS:]).all()


def test_prompt_bit_mask_builds_a_clamping_cond():
    from bitgen.diffusion.cond import Cond

    rows = encode_rows(np.zeros((2, 81), np.uint8), np.ones((2, 81), np.uint8))
    cond = Cond.clamped(prompt_bit_mask(2), rows_to_bits(rows))
    state = cond.clamp(np.zeros((2, ROW_BITS), np.float32) + 0.5)
    assert (np.asarray(state)[:, : PROMPT_TOKENS * CODE_WIDTH] == rows_to_bits(rows)[:, :364]).all()
    assert (np.asarray(state)[:, PROMPT_TOKENS * CODE_WIDTH:] == 0.5).all()


def test_prompt_views_for_both_families(sample):
    """AR continues ``prompt_ids``; bit diffusion clamps ``prompt_bits`` under the bit mask."""
    puzzles, solutions, _ = sample["easy"]
    rows = encode_rows(puzzles[:4], solutions[:4])
    assert (prompt_ids(puzzles[:4]) == rows[:, :PROMPT_TOKENS]).all()
    bits, mask = prompt_bits(puzzles[:4]), prompt_bit_mask(4)
    assert (bits[mask] == rows_to_bits(rows)[mask]).all() and not bits[~mask].any()


def test_rows_feed_the_data_pipeline_unchanged(sample):
    from bitgen.data.pipeline import make_batch_dataset

    puzzles, solutions, _ = sample["medium"]
    rows = encode_rows(puzzles[:8], solutions[:8])
    batch = make_batch_dataset(rows, SUDOKU_CODEC, global_batch=4, seed=0,
                               prompt_tokens=PROMPT_TOKENS)[0]
    assert batch["ids"].shape == (4, ROW_TOKENS) and batch["bits"].shape == (4, ROW_BITS)
    picked = [int(np.flatnonzero((rows == ids).all(1))[0]) for ids in batch["ids"]]
    assert (batch["bits"] == rows_to_bits(rows[picked])).all()
    assert (batch["cond_mask"] == prompt_bit_mask(4)).all()


def test_text_forms_show_the_grid():
    puzzles, solutions, _ = generate_split(2, 1, {"easy": 1})
    text = format_grid(puzzles[0])
    assert len(text.splitlines()) == 11 and text.count(".") == 81 - 40
    assert format_grid(grid_to_tokens(solutions[0])) == format_grid(solutions[0])
    row = format_row(np.append(encode_rows(puzzles, solutions)[0, :-1], 14))
    assert row[0] == "^" and row.count("|") == 16 and row.endswith("?")


# --- metrics --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truth(sample):
    """3 puzzles of each difficulty, their solutions and their (perfect) rows."""
    puzzles = np.concatenate([sample[name][0][:3] for name in DIFFICULTIES])
    solutions = np.concatenate([sample[name][1][:3] for name in DIFFICULTIES])
    return puzzles, solutions, encode_rows(puzzles, solutions).astype(np.uint32)


def test_perfect_predictions_score_one(truth):
    puzzles, solutions, rows = truth
    scores = score(rows, puzzles, solutions)
    assert list(scores) == [*DIFFICULTIES, "all"] and scores["all"].n == 9
    for s in scores.values():
        assert (s.exact_match, s.cell_accuracy, s.solved) == (1.0, 1.0, 1.0)
        assert s.invalid_code_rate == 0.0 == s.separator_error_rate
    assert score_bits(rows_to_bits(rows), puzzles, solutions) == scores
    assert "all" in format_scores(scores)


def test_one_wrong_cell_and_one_invalid_code(truth):
    puzzles, solutions, rows = truth
    pred = rows.copy()
    pred[0, PROMPT_TOKENS] = pred[0, PROMPT_TOKENS] % 9 + 1  # easy row 0: first cell, another digit
    pred[3, PROMPT_TOKENS + 1] = 13  # medium row 0: second cell, an invalid code
    pred[6, PROMPT_TOKENS + 9] = 5  # hard row 0: the first separator
    s = score(pred, puzzles, solutions)
    assert s["easy"].exact_match == pytest.approx(2 / 3) and s["easy"].solved == pytest.approx(2 / 3)
    assert s["easy"].cell_accuracy == pytest.approx((3 * 81 - 1) / (3 * 81))
    assert s["medium"].invalid_code_rate == pytest.approx(1 / (3 * 89))
    assert s["medium"].cell_accuracy == pytest.approx((3 * 81 - 1) / (3 * 81))
    assert s["hard"].separator_error_rate == pytest.approx(1 / (3 * 8))
    assert s["hard"].exact_match == pytest.approx(2 / 3) and s["hard"].cell_accuracy == 1.0
    assert s["hard"].solved == 1.0  # the cells are right; only the layout is broken
    assert s["all"].exact_match == pytest.approx(6 / 9)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_corrupted_cells_lower_cell_accuracy_by_their_count(truth, data):
    puzzles, solutions, rows = truth
    cells = data.draw(st.sets(st.integers(0, 80), max_size=81))
    values = [data.draw(st.integers(0, 15).filter(lambda v, c=c: v != solutions[0][c])) for c in cells]
    pred = rows[:1].copy()
    positions = PROMPT_TOKENS + np.array([(c // 9) * 10 + c % 9 for c in sorted(cells)], int)
    pred[0, positions] = [v for _, v in sorted(zip(cells, values))]
    s = score(pred, puzzles[:1], solutions[:1])["all"]
    # one row: each mean is a count divided by 81 (or 89), the same single rounding on both sides
    assert s.cell_accuracy == (81 - len(cells)) / 81
    assert s.invalid_code_rate == sum(v >= 12 for v in values) / 89
    assert s.exact_match == float(not cells) == s.solved


def test_without_solutions_only_validity_is_scored(truth):
    puzzles, _, rows = truth
    s = score(rows, puzzles)["all"]
    assert s.exact_match is None and s.cell_accuracy is None and s.solved == 1.0


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_solved_equals_exact_cells_for_unique_puzzles(truth, data):
    """A puzzle with one solution is solved exactly when its cells equal that solution."""
    puzzles, solutions, _ = truth
    i = data.draw(st.integers(0, len(puzzles) - 1))
    kind = data.draw(st.sampled_from(["true", "relabel", "swap", "cell"]))
    grid = solutions[i].copy()
    if kind == "relabel":  # a valid grid, clues broken (unless the relabelling is the identity)
        grid = np.asarray(data.draw(st.permutations(range(1, 10))), np.uint8)[grid - 1]
    elif kind == "swap":  # swap two rows of one band: a valid grid
        r1, r2 = data.draw(st.sampled_from([(0, 1), (3, 5), (7, 8)]))
        grid = grid.reshape(9, 9)[[*range(r1), r2, *range(r1 + 1, r2), r1, *range(r2 + 1, 9)]].ravel()
    elif kind == "cell":
        cell = data.draw(st.integers(0, 80))
        grid[cell] = data.draw(st.integers(0, 15).filter(lambda v: v != solutions[i][cell]))
    solved = is_solved(grid[None], puzzles[i][None])[0]
    assert solved == (grid == solutions[i]).all()


def test_is_solved_rejects_a_grid_with_a_repeat():
    grid = solve(np.zeros(81, np.uint8))
    assert is_solved(grid[None], np.zeros((1, 81)))[0]
    grid[0], grid[1] = grid[1], grid[1]
    assert not is_solved(grid[None], np.zeros((1, 81)))[0]
    latin = np.array([(r + c) % 9 + 1 for r in range(9) for c in range(9)])  # rows, columns fine
    assert not is_solved(latin[None], np.zeros((1, 81)))[0]
    assert is_solved(latin.reshape(9, 9)[[0, 3, 6, 1, 4, 7, 2, 5, 8]].ravel()[None], np.zeros((1, 81)))[0]


# --- puzzle files ---------------------------------------------------------------------------------


def test_read_puzzles_and_write_predictions_round_trip(tmp_path, truth):
    puzzles, solutions, rows = truth
    path = tmp_path / "p.txt"
    path.write_text("".join(f"{''.join(map(str, p))}\n\n" for p in puzzles))
    got, none = read_puzzles(path)
    assert none is None and (got == puzzles).all()
    out = tmp_path / "pred.txt"
    write_predictions(out, puzzles, rows)
    got, got_solutions = read_puzzles(out)
    assert (got == puzzles).all() and (got_solutions == solutions).all()


@pytest.mark.parametrize("second_line, fragment", [
    ("1" * 80, "has 80 characters"),
    ("0" * 40 + "x" + "0" * 40, "character 41 is 'x'"),
    ("0" * 81 + " " + "1" * 81 + " 3", "3 fields"),
    ("0" * 81 + " " + "0" * 81, "solution character 1 is '0'"),
    ("0" * 81 + " " + "1" * 81, r"not a valid Sudoku \(row 1 repeats 1\)"),
    ("5" + "0" * 8 + "5" + "0" * 71, r"clues clash \(column 1 repeats 5\)"),
    ("5" + "0" * 9 + "5" + "0" * 70, r"clues clash \(box 1 repeats 5\)"),
    ("0" * 80 + "{last} {good}", "changes the clue at row 9, column 9"),
])
def test_read_puzzles_names_the_bad_line(tmp_path, second_line, fragment):
    good = "".join(map(str, solve(np.zeros(81, np.uint8))))
    path = tmp_path / "p.txt"
    first = "0" * 81 + " " + good if " " in second_line else "0" * 81
    last = str(int(good[80]) % 9 + 1)  # a clue that differs from the solution's last cell
    path.write_text(f"{first}\n{second_line.format(last=last, good=good)}\n")
    with pytest.raises(PuzzleFileError, match=f"p.txt:2: .*{fragment}") as err:
        read_puzzles(path)
    assert "\n" not in str(err.value)


def test_read_puzzles_refuses_mixed_solutions_and_empty_files(tmp_path):
    good = "".join(map(str, solve(np.zeros(81, np.uint8))))
    path = tmp_path / "p.txt"
    path.write_text(f"{'0' * 81} {good}\n{'0' * 81}\n")
    with pytest.raises(PuzzleFileError, match="p.txt:2: .*line 1"):
        read_puzzles(path)
    path.write_text("\n  \n")
    with pytest.raises(PuzzleFileError, match="no puzzles"):
        read_puzzles(path)
