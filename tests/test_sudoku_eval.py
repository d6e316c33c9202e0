"""`bitgen eval --task sudoku` and `--guidance`: end to end on tiny randomly initialised Sudoku runs
(CoBit with the prompt bits clamped, AR continuing the prompt ids), a forced-solution scorer check,
and the one-line errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_eval_cli import _save_run

from bitgen import cli
from bitgen.config import DataConfig, ExperimentConfig, ModelConfig, SamplerConfig
from bitgen.data.sudoku import (
    PROMPT_TOKENS,
    SUDOKU_CODEC,
    encode_rows,
    prompt_ids,
)
from bitgen.data.sudoku_corpus import sudoku_tokenizer
from bitgen.data.sudoku_gen import generate_split
from bitgen.eval import sudoku_run
from bitgen.families.ar import ar_config
from bitgen.loading import load_model
from bitgen.textcodec import TextCodec

N_PUZZLES = 5
SUDOKU_MODEL = ModelConfig(patch_size=4, seq_tokens=180, embed_dim=16, n_heads=2, n_blocks=1,
                           dim_ff=32, content_dim=8, head_hidden=8, dropout=0.0)


def _sudoku_text() -> TextCodec:
    """The text pipeline a Sudoku run saves in ``tokenizer/`` (decoding is only for display; the
    metrics read codes)."""
    return TextCodec(sudoku_tokenizer(), SUDOKU_CODEC)


def _sudoku_run(run_dir, task: str):
    from bitgen.diffusion.denoiser import init_params
    from bitgen.nn.ar import init_ar_params

    data = DataConfig(source="sudoku", batch_size=4, cache_dir=str(run_dir.parent / "cache"))
    sampler = SamplerConfig(nfe=6, gamma=0.1, batch_size=4, grid="karras")
    cfg = ExperimentConfig(name=f"tiny_sudoku_{task}", task=task, model=SUDOKU_MODEL, data=data,
                           sampler=sampler)
    params = (init_params(jax.random.key(0), SUDOKU_MODEL) if task == "cobit" else
              init_ar_params(jax.random.key(1), ar_config(cfg, SUDOKU_CODEC.vocab_size)))
    _save_run(run_dir, cfg, params)
    _sudoku_text().save(run_dir / "tokenizer")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sudoku_runs")
    return {task: _sudoku_run(root / task, task) for task in ("cobit", "ar")}


@pytest.fixture(scope="module")
def puzzle_set():
    """5 generated puzzles (one per line in a file, with and without solutions)."""
    puzzles, solutions, _ = generate_split(3, N_PUZZLES, {"easy": 1.0, "hard": 1.0}, tag=0)
    return puzzles, solutions


def _puzzle_file(path, puzzles, solutions=None):
    lines = ["".join(map(str, p)) + ("" if solutions is None else " " + "".join(map(str, s)))
             for p, s in zip(puzzles, solutions if solutions is not None else puzzles)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _eval(run, *extra):
    return cli.main(["eval", "--run-dir", str(run), "--no-progress", *extra])


# Without solutions only scoring changes, which does not depend on the family: AR (cheap) covers it.
@pytest.mark.parametrize(("task", "with_solutions"), [("cobit", True), ("ar", True), ("ar", False)])
def test_eval_task_sudoku_end_to_end_keeps_the_prompt(runs, puzzle_set, tmp_path, task,
                                                      with_solutions, capsys):
    puzzles, solutions = puzzle_set
    path = _puzzle_file(tmp_path / "p.txt", puzzles, solutions if with_solutions else None)
    out = tmp_path / "out"
    assert _eval(runs[task], "--task", "sudoku", "--puzzles", str(path), "--out", str(out),
                 "--nfe", "6", "--gamma", "0,0.2", "--batch-size", "3") == 0
    report = json.loads((out / sudoku_run.METRICS_FILE).read_text())
    expected_points = ["nfe6_gamma0", "nfe6_gamma0.2"] if task == "cobit" else ["greedy", "t1_p1"]
    names = [r["point"] for r in report["rows"]]
    assert [n.rsplit("_", 1)[0] if task == "cobit" else n for n in names] == expected_points
    assert report["n"] == N_PUZZLES and report["solutions"] is with_solutions
    for row in report["rows"]:
        assert set(row["scores"]) == {"easy", "hard", "all"}
        for s in row["scores"].values():
            assert (s["exact_match"] is None) is (not with_solutions)
            assert 0 <= s["solved"] <= 1 and 0 <= s["invalid_code_rate"] <= 1
        lines = (out / f"predictions_{row['point']}_seed0.txt").read_text().splitlines()
        assert len(lines) == N_PUZZLES  # "puzzle prediction", 81 characters each
        assert [line.split()[0] for line in lines] == ["".join(map(str, p)) for p in puzzles]
        assert all(len(line.split()[1]) == 81 for line in lines)
    assert "| point | seed | group |" in (out / sudoku_run.TABLE_FILE).read_text()
    printed = capsys.readouterr().out
    assert "exact%" in printed and "solved%" in printed


@pytest.mark.parametrize("task", ["cobit", "ar"])
def test_generated_rows_begin_with_the_prompt_exactly(runs, puzzle_set, task):
    puzzles, _ = puzzle_set
    model = load_model(str(runs[task]))
    for point in sudoku_run.operating_points(model, nfe=6, gammas=[0.3], temperature=1.0, top_p=1.0):
        codes = sudoku_run.solve_puzzles(model, point, puzzles, seed=1, batch_size=2, progress=False)
        assert codes.shape == (N_PUZZLES, 180)
        np.testing.assert_array_equal(codes[:, :PROMPT_TOKENS], prompt_ids(puzzles))


def test_a_model_that_writes_the_solution_scores_exact_match_one(runs, puzzle_set, tmp_path,
                                                                  monkeypatch):
    puzzles, solutions = puzzle_set
    truth = {p.tobytes(): row for p, row in zip(puzzles, encode_rows(puzzles, solutions))}

    def oracle(model, point):  # a test double for the sampler: the true rows, looked up per puzzle
        return lambda params, key, batch: np.stack([truth[p.tobytes()] for p in batch])

    monkeypatch.setitem(sudoku_run._SOLVERS, "cobit", oracle)
    out = tmp_path / "out"
    path = _puzzle_file(tmp_path / "p.txt", puzzles, solutions)
    assert _eval(runs["cobit"], "--puzzles", str(path), "--out", str(out), "--batch-size", "2") == 0
    (row,) = json.loads((out / sudoku_run.METRICS_FILE).read_text())["rows"]
    for s in row["scores"].values():
        assert (s["exact_match"], s["cell_accuracy"], s["solved"], s["invalid_code_rate"]) == (1, 1, 1, 0)


def test_default_puzzles_are_the_first_of_the_validation_split(runs, puzzle_set, tmp_path,
                                                               monkeypatch):
    puzzles, solutions = puzzle_set
    rows = encode_rows(puzzles, solutions)
    calls = []

    def small_rows(cache_dir, *args, **kwargs):  # the cached set without generating 50k puzzles
        calls.append(cache_dir)
        return type("Rows", (), {"valid": rows})()

    monkeypatch.setattr(sudoku_run, "sudoku_rows", small_rows)
    out = tmp_path / "out"
    assert _eval(runs["ar"], "--num", "3", "--temperature", "0", "--out", str(out)) == 0
    report = json.loads((out / sudoku_run.METRICS_FILE).read_text())
    assert calls and report["n"] == 3 and report["puzzles"] == "validation split"
    assert [r["point"] for r in report["rows"]] == ["greedy"]
    assert _eval(runs["ar"], "--num", "9", "--out", str(out)) == 2  # more than the split holds


def test_wrong_task_and_run_type_are_one_line(runs, tmp_path, capsys):
    from bitgen.diffusion.denoiser import init_params

    text_cfg = ExperimentConfig(model=SUDOKU_MODEL, data=DataConfig(source="fortunes"))
    text_run = tmp_path / "text"
    _save_run(text_run, text_cfg, init_params(jax.random.key(0), SUDOKU_MODEL))
    _sudoku_text().save(text_run / "tokenizer")
    checks = [
        ((text_run, "--task", "sudoku"), "needs a Sudoku run"),
        ((runs["cobit"], "--task", "text", "--evaluator", "none"), "use --task sudoku"),
        ((text_run, "--evaluator", "none", "--nfe", "8"), "--nfe apply to --task sudoku"),
        ((text_run,), "needs --evaluator"),
        ((runs["ar"], "--guidance", "2"), "task=ar runs have no classifier-free guidance"),
    ]
    for argv, message in checks:
        assert _eval(*argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_guidance_config_key_is_validated_in_one_line():
    from bitgen.config import ConfigError, apply_overrides

    assert apply_overrides(ExperimentConfig(), []).sampler.guidance == 1.0  # the conditional model
    assert apply_overrides(ExperimentConfig(), ["sampler.guidance=0"]).sampler.guidance == 0.0
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="guidance") as err:
            apply_overrides(ExperimentConfig(), [f"sampler.guidance={bad}"])
        assert "\n" not in str(err.value)


def test_guided_sudoku_eval_runs_the_guided_sampler(runs, puzzle_set, monkeypatch, capsys):
    """--guidance 2 reaches the Sudoku solver: the sampler is built guided (half the grid points at
    the same NFE) with w = 2 in its Cond, and the clamped prompt is still kept exactly."""
    import bitgen.sampling as sampling

    puzzles, _ = puzzle_set
    built, real = [], sampling.build_sampler

    def spy(*args, guided=False, **kwargs):
        draw = real(*args, guided=guided, **kwargs)

        def recorded(params, key, batch=None, *, cond=None):
            built.append((guided, None if cond.guidance is None else float(cond.guidance),
                          len(draw.grid)))
            return draw(params, key, batch, cond=cond)

        return recorded

    monkeypatch.setattr(sampling, "build_sampler", spy)
    model = load_model(str(runs["cobit"]), overrides=["sampler.guidance=2"])
    (point,) = sudoku_run.operating_points(model, nfe=9, gammas=None, temperature=1.0, top_p=1.0)
    codes = sudoku_run.solve_puzzles(model, point, puzzles[:2], seed=0, batch_size=2, progress=False)
    np.testing.assert_array_equal(codes[:, :PROMPT_TOKENS], prompt_ids(puzzles[:2]))
    plain = load_model(str(runs["cobit"]))
    (plain_point,) = sudoku_run.operating_points(plain, nfe=9, gammas=None, temperature=1.0, top_p=1.0)
    sudoku_run.solve_puzzles(plain, plain_point, puzzles[:2], seed=0, batch_size=2, progress=False)
    # DDIM + carry: (nfe - 1) // calls points, one call per denoise unguided and two guided.
    assert built == [(True, 2.0, 4), (False, None, 8)]
    assert point.name == f"nfe9_gamma0.1_w2_{sudoku_run.sampler_digest(point.sampler_cfg)}"


def test_reports_of_more_points_add_up_and_another_evaluation_replaces_them(runs, puzzle_set,
                                                                              tmp_path, monkeypatch,
                                                                              capsys):
    puzzles, solutions = puzzle_set

    def oracle(model, point):  # a test double for the sampler: the puzzles' true rows
        rows = dict(zip((p.tobytes() for p in puzzles), encode_rows(puzzles, solutions)))
        return lambda params, key, batch: np.stack([rows[p.tobytes()] for p in batch])

    monkeypatch.setitem(sudoku_run._SOLVERS, "cobit", oracle)
    out, path = tmp_path / "out", _puzzle_file(tmp_path / "p.txt", puzzles, solutions)

    def evaluate(*extra):
        assert _eval(runs["cobit"], "--puzzles", str(path), "--out", str(out), *extra) == 0
        report = json.loads((out / sudoku_run.METRICS_FILE).read_text())
        return [(r["point"].rsplit("_", 1)[0], r["settings"]["name"], r["seed"], r["n"])
                for r in report["rows"]]

    assert evaluate("--gamma", "0", "--nfe", "6") == [("nfe6_gamma0", "ddim", 0, 5)]
    # Another NFE, another seed and a repeated point: the earlier rows stay, the repeat is replaced.
    assert evaluate("--gamma", "0", "--nfe", "8", "--seeds", "0,1") == [
        ("nfe6_gamma0", "ddim", 0, 5), ("nfe8_gamma0", "ddim", 0, 5), ("nfe8_gamma0", "ddim", 1, 5)]
    assert evaluate("--gamma", "0", "--nfe", "6") == [
        ("nfe8_gamma0", "ddim", 0, 5), ("nfe8_gamma0", "ddim", 1, 5), ("nfe6_gamma0", "ddim", 0, 5)]
    # Another sampler at the same NFE and γ: its own row and predictions, under another name.
    assert evaluate("--gamma", "0", "--nfe", "6", "sampler.name=heun")[-1] == ("nfe6_gamma0", "heun", 0, 5)
    report = json.loads((out / sudoku_run.METRICS_FILE).read_text())
    names = [r["point"] for r in report["rows"]]
    assert len(report["rows"]) == 4 and len(set(names)) == 3
    for name in set(names):
        assert (out / f"predictions_{name}_seed0.txt").is_file()
    assert f"{names[0]} | 1 | all" in (out / sudoku_run.TABLE_FILE).read_text()
    capsys.readouterr()
    # Other puzzles (the first 3): another evaluation, which replaces the report and says so.
    assert evaluate("--gamma", "0", "--nfe", "6", "--num", "3") == [("nfe6_gamma0", "ddim", 0, 3)]
    assert "replaced" in capsys.readouterr().out


def test_a_missing_entropy_table_is_refused_before_any_puzzle_is_read(runs, tmp_path, capsys):
    # The puzzle file does not exist: reaching it would be another error.
    assert _eval(runs["cobit"], "sampler.grid=entropic", "--puzzles", str(tmp_path / "none.txt")) == 2
    err = capsys.readouterr().err
    assert "needs an entropy table" in err and "sampler.grid=karras" in err


def test_flags_of_the_other_task_and_bad_counts_are_refused_before_any_work(runs, tmp_path, capsys):
    checks = [
        ((runs["cobit"], "--ar-run", str(runs["ar"])), "--ar-run apply to --task text"),
        ((runs["cobit"], "--control", "--sweep", "nfe=8"), "--sweep, --control apply to --task text"),
        ((runs["ar"], "--num", "0"), "--num must be >= 1"),
    ]
    for argv, message in checks:
        assert _eval(*argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
