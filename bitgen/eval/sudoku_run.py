"""Sudoku evaluation of a trained run (issue 12): solve puzzles batch by batch and score them.

A Sudoku run is a run whose config has ``data.source == "sudoku"`` (180-token rows, the 12-id
``SUDOKU_CODEC``). Each puzzle's prompt (``BOS puzzle BOS``, 91 tokens) is given and the model
writes the 89-token solution:

* CoBit: the 364 prompt bits are clamped at every solver step (``Cond.clamped(prompt_bit_mask,
  prompt_bits)``); ``sampler.guidance`` w != 1 runs the guided sampler over them.
* AR: ``ar_sample`` continues ``prompt_ids``; temperature 0 is greedy (argmax).

Operating points: CoBit one per γ (at the given NFE, default 180 as in the issue), AR greedy and,
unless the temperature is 0, sampled at (temperature, top-p). The metrics are
``bitgen.eval.sudoku.score`` per difficulty group.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bitgen.config import ExperimentConfig, SamplerConfig
from bitgen.data.sudoku import (
    CODE_WIDTH,
    ROW_TOKENS,
    VOCAB_SIZE,
    bits_to_codes,
    prompt_bit_mask,
    prompt_bits,
    prompt_ids,
    split_rows,
    sudoku_rows,
)
from bitgen.data.sudoku_corpus import SUDOKU_SOURCE
from bitgen.errors import BitgenError
from bitgen.eval.sudoku import format_scores, score, write_predictions
from bitgen.files import write_atomic
from bitgen.generation import check_guidance
from bitgen.loading import LoadedModel

DEFAULT_NUM = 300  # validation puzzles: a few CPU minutes for the sudoku_cpu model
DEFAULT_NFE = 180  # the protocol
METRICS_FILE, TABLE_FILE = "sudoku_metrics.json", "sudoku_metrics.md"

# (params, key, puzzles uint8 [B, 81]) -> generated codes [B, 180] (12-15 = invalid codes)
SolveBatch = Callable[[Any, Any, np.ndarray], np.ndarray]


class SudokuEvalError(BitgenError, ValueError):
    """A run or setting the Sudoku evaluation cannot use."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One operating point. name: filename-safe label (``nfe180_gamma0.2_<digest>``, ``greedy``,
    ``t0.9_p1``), distinct for every setting that changes the draws: a CoBit name ends in six hex
    digits of its whole sampler config (``sampler_digest``)."""

    name: str
    sampler_cfg: SamplerConfig
    temperature: float
    top_p: float


def is_sudoku_run(cfg: ExperimentConfig) -> bool:
    return cfg.data.source == SUDOKU_SOURCE


def check_sudoku_model(model: LoadedModel) -> None:
    """Refuse a model that is not a Sudoku run of a family this evaluation can drive."""
    cfg = model.cfg
    if not is_sudoku_run(cfg):
        raise SudokuEvalError(f"--task sudoku needs a Sudoku run (data.source='sudoku'), but "
                              f"{model.source} has data.source={cfg.data.source!r}; evaluate it "
                              "with --task text (GenPPL)")
    codec = model.text.codec
    if (cfg.model.seq_tokens, codec.vocab_size, codec.width) != (ROW_TOKENS, VOCAB_SIZE, CODE_WIDTH):
        raise SudokuEvalError(f"{model.source} is not laid out as Sudoku rows: seq_tokens="
                              f"{cfg.model.seq_tokens}, {codec.vocab_size} ids of {codec.width} bits "
                              f"(need {ROW_TOKENS}, {VOCAB_SIZE}, {CODE_WIDTH}); retrain with a sudoku config")
    if model.task not in _SOLVERS:
        raise SudokuEvalError(f"--task sudoku drives {sorted(_SOLVERS)} runs, not task={model.task}")


def operating_points(model: LoadedModel, *, nfe: int, gammas: list[float] | None,
                     temperature: float, top_p: float) -> list[Point]:
    """CoBit: one point per γ (default: the run's ``sampler.gamma``) at ``nfe``; AR: greedy, then
    sampled at (temperature, top_p) unless temperature is 0."""
    if model.task == "ar":
        points = [Point("greedy", model.cfg.sampler, 0.0, 1.0)]
        if temperature > 0:
            points.append(Point(f"t{temperature:g}_p{top_p:g}", model.cfg.sampler, temperature, top_p))
        return points
    base = model.cfg.sampler
    suffix = "" if base.guidance == 1 else f"_w{base.guidance:g}"
    points = []
    for g in gammas or [base.gamma]:
        sampler_cfg = dataclasses.replace(base, nfe=nfe, gamma=g)
        points.append(Point(f"nfe{nfe}_gamma{g:g}{suffix}_{sampler_digest(sampler_cfg)}", sampler_cfg,
                            temperature, top_p))
    return points


def sampler_digest(sampler_cfg: SamplerConfig) -> str:
    """Six hex digits of every sampler setting but ``batch_size`` (the evaluation batches by its
    own ``--batch-size``): the name part that tells apart, e.g., DDIM and Heun at one NFE."""
    import hashlib

    fields = {k: v for k, v in dataclasses.asdict(sampler_cfg).items() if k != "batch_size"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:6]


def check_points(model: LoadedModel, points: list[Point]) -> None:
    """Refuse, before any puzzle is read or built, a point the run cannot draw."""
    from bitgen.families.cobit import check_table

    for point in points:
        check_guidance(model, point.sampler_cfg, conditioned=True)
        if model.task == "cobit":
            check_table(model, point.sampler_cfg)


def _cobit_solver(model: LoadedModel, point: Point) -> SolveBatch:
    import jax.numpy as jnp

    from bitgen.diffusion.cond import Cond
    from bitgen.sampling import build_sampler

    sampler_cfg = point.sampler_cfg
    guided = sampler_cfg.guidance != 1
    sampler = build_sampler(model.cfg.model, sampler_cfg, model.table, model.cfg.model.seq_bits,
                            model.cfg.diffusion, guided=guided)
    scale = {"guidance": jnp.float32(sampler_cfg.guidance)} if guided else {}

    def solve(params, key, puzzles):
        cond = Cond.clamped(prompt_bit_mask(len(puzzles)), prompt_bits(puzzles), **scale)
        return bits_to_codes(np.asarray(sampler(params, key, len(puzzles), cond=cond).bits))

    return solve


def _ar_solver(model: LoadedModel, point: Point) -> SolveBatch:
    import jax.numpy as jnp

    from bitgen.families.ar import ar_config
    from bitgen.nn.ar import ar_sample

    model_cfg = ar_config(model.cfg, model.text.vocab_size)

    def solve(params, key, puzzles):
        ids = jnp.asarray(prompt_ids(puzzles), jnp.int32)
        return np.asarray(ar_sample(params, key, ids, cfg=model_cfg, length=ROW_TOKENS,
                                    temperature=point.temperature, top_p=point.top_p))

    return solve


_SOLVERS: dict[str, Callable[[LoadedModel, Point], SolveBatch]] = {"cobit": _cobit_solver,
                                                                   "ar": _ar_solver}


def solve_puzzles(model: LoadedModel, point: Point, puzzles: np.ndarray, *, seed: int,
                  batch_size: int, progress: bool = True, flag=None) -> np.ndarray:
    """Generated codes [n, 180] for ``puzzles`` [N, 81], in batches of ``batch_size``; batch k
    draws with ``fold_in(key(seed), k)``. n < N only when ``flag`` (a PreemptionFlag) stopped it."""
    import jax

    check_points(model, [point])
    solve = _SOLVERS[model.task](model, point)
    root, out = jax.random.key(seed), []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(puzzles), unit="puzzle", desc=point.name, leave=False, dynamic_ncols=True)
    try:
        for k, start in enumerate(range(0, len(puzzles), batch_size)):
            if flag is not None and flag.requested:
                break
            batch = np.asarray(puzzles[start:start + batch_size])
            out.append(solve(model.params, jax.random.fold_in(root, k), batch))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(out) if out else np.zeros((0, ROW_TOKENS), np.uint32)


def validation_puzzles(cfg: ExperimentConfig, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` validation puzzles and their solutions [num, 81] of the cached data set
    (``sudoku_rows(cfg.data.cache_dir)``, built on first use: about 100 s)."""
    valid = sudoku_rows(cfg.data.cache_dir).valid
    if not 1 <= num <= len(valid):
        raise SudokuEvalError(f"--num {num} must be in [1, {len(valid)}] (the validation split)")
    return split_rows(valid[:num])


def evaluate_points(model: LoadedModel, points: list[Point], puzzles: np.ndarray,
                    solutions: np.ndarray | None, *, seeds: list[int], batch_size: int,
                    out_dir: Path, progress: bool = True, flag=None, log=print) -> list[dict]:
    """Solve and score every (point, seed); writes ``predictions_<point>_seed<S>.txt`` per row
    and returns one JSON-ready row each (settings, seconds, scores per group)."""
    rows = []
    for point in points:
        for seed in seeds:
            started = time.perf_counter()
            codes = solve_puzzles(model, point, puzzles, seed=seed, batch_size=batch_size,
                                  progress=progress, flag=flag)
            if len(codes) < len(puzzles):
                return rows
            seconds = time.perf_counter() - started
            predictions = out_dir / f"predictions_{point.name}_seed{seed}.txt"
            write_predictions(predictions, puzzles, codes)
            scores = score(codes, puzzles, solutions)
            settings = model.family.settings(point.sampler_cfg, options=model.cfg.family,
                                             temperature=point.temperature, top_p=point.top_p)
            rows.append({"point": point.name, "seed": seed, "n": len(puzzles),
                         "seconds": round(seconds, 2), "settings": settings,
                         "predictions": str(predictions),
                         "scores": {g: dataclasses.asdict(s) for g, s in scores.items()}})
            log(f"{point.name} seed {seed}: {len(puzzles)} puzzles in {seconds:.1f} s "
                f"({len(puzzles) / seconds:.1f} puzzles/s)\n{format_scores(scores)}")
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One Markdown line per (point, seed, group); percentages, ``-`` where unknown."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = ["| point | seed | group | n | exact % | cell % | solved % | invalid % |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for group, s in row["scores"].items():
            lines.append(f"| {row['point']} | {row['seed']} | {group} | {s['n']} | "
                         f"{pct(s['exact_match'])} | {pct(s['cell_accuracy'])} | {pct(s['solved'])} | "
                         f"{pct(s['invalid_code_rate'])} |")
    return "\n".join(lines) + "\n"


def merged_rows(metrics: Path, header: dict, rows: list[dict]) -> tuple[list[dict], str | None]:
    """``rows`` after the rows of an earlier report at ``metrics`` with the same ``header`` (run,
    step, puzzles) and other (settings, seed): evaluations of more points add up, and a point drawn
    again replaces its row. Returns the rows and, when an existing report is for another header and
    gets replaced, a note saying which."""
    if not metrics.is_file():
        return rows, None
    try:
        old = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return rows, f"replaced the unreadable {metrics}"
    if {k: old.get(k) for k in header} != header:
        described = ", ".join(f"{k}={old.get(k)}" for k in ("run", "step", "puzzles", "n"))
        return rows, f"replaced {metrics}, which held another evaluation ({described})"
    def drawn_as(row: dict) -> tuple[str, int]:
        return json.dumps(row["settings"], sort_keys=True), row["seed"]

    new = {drawn_as(r) for r in rows}
    return [r for r in old.get("rows", []) if drawn_as(r) not in new] + rows, None


def write_report(rows: list[dict], out_dir: Path, header: dict, log=print) -> tuple[Path, Path]:
    """``sudoku_metrics.json`` (``header`` + rows, merged with an earlier report of the same header)
    and ``sudoku_metrics.md`` in ``out_dir``."""
    metrics, table = out_dir / METRICS_FILE, out_dir / TABLE_FILE
    rows, note = merged_rows(metrics, header, rows)
    if note is not None:
        log(note)
    write_atomic(metrics, json.dumps({**header, "rows": rows}, indent=1) + "\n")
    write_atomic(table, markdown_table(rows))
    return metrics, table
