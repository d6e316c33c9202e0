"""``bitgen eval``: sweep a CoBit run over samplers × grids × NFE × γ and score every point.

Examples::

    bitgen eval --run-dir runs/demo/cobit --evaluator runs/demo/ar_eval \\
        --sweep "name=ddim grid=entropic,karras nfe=32,64,128 gamma=0,0.1,0.2,0.3" \\
        --seeds 0,1,2 --num 64 --ar-run runs/demo/ar --ar-temperatures 0.8,0.9,1.0
    bitgen eval --run-dir runs/owt --evaluator gpt2:~/models/gpt2-large --sweep "gamma=0.13" --num 1024
    bitgen eval --run-dir runs/cobit_s_owt --config cobit_s_owt --evaluator gpt2:~/models/gpt2-large

``--num``, ``--seeds``, ``--sweep``, ``--reference``, ``--test-source`` and ``--evaluator-dtype``
default to the run config's ``eval`` section; the paper configs set the paper's protocol there
(1024 samples per point, seeds 42-51, the test split, GPT-2 Large in bf16; docs/evaluation.md).

Writes to ``--out-dir`` (default ``<run-dir>/eval``): ``results.jsonl`` (one row per point and
seed: GenPPL, entropy, seed, settings, n samples, seconds; reused on re-runs), ``table.csv``
(mean ± std over seeds) and ``frontier.png``; prints the table.

Sudoku runs (``data.source="sudoku"``; ``bitgen.eval.sudoku_run``) are evaluated as a puzzle
benchmark, the default ``--task`` for them (GenPPL means nothing there)::

    bitgen eval --run-dir runs/sudoku_cpu --task sudoku                  # 300 validation puzzles
    bitgen eval --run-dir runs/sudoku_cpu --gamma 0,0.1,0.2 --nfe 180 --guidance 1.5
    bitgen eval --run-dir runs/sudoku_ar --puzzles mine.txt --temperature 0.8 --out out/

``--num`` puzzles (default 300: a few CPU minutes) from the cached validation split, or every
puzzle of ``--puzzles FILE`` (81 digits per line, 0 = blank, optionally a space and the solution);
CoBit one point per ``--gamma`` at ``--nfe`` (default 180) with the 364 prompt bits clamped, AR
greedy plus sampled at ``--temperature``/``--top-p``. Prints exact match, cell accuracy, solved
and invalid-code rate per difficulty and writes ``sudoku_metrics.json``, ``sudoku_metrics.md``
and ``predictions_<point>_seed<S>.txt`` to ``--out-dir`` (default ``<run-dir>/eval/sudoku``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitgen.eval.sample_cli import add_model_arguments, add_override_argument, load_model_from_args

from bitgen.eval.sudoku_run import DEFAULT_NFE, DEFAULT_NUM

TASKS = ("text", "sudoku")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_override_argument(parser)
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="text: GenPPL sweep; sudoku: the puzzle benchmark (default: sudoku for "
                             "a run with data.source=sudoku, else text)")
    parser.add_argument("--evaluator",
                        help="--task text (required): GenPPL evaluator, an AR run directory "
                             "(task=ar), gpt2:DIR, or none (only draw and cache the samples)")
    parser.add_argument("--sweep", default=None,
                        help='sampler grid, e.g. "name=ddim,heun grid=entropic,karras nfe=32,64 '
                             'gamma=0,0.1,0.2 window_q=0:1,0.1:0.9" (default: eval.sweep, else the '
                             'run\'s sampler)')
    parser.add_argument("--seeds", type=_ints, default=None,
                        help="comma-separated seeds (default: eval.seeds, 0)")
    parser.add_argument("--num", type=int, default=None,
                        help="samples per point and seed (default: eval.num, 64; paper: 1024); "
                             f"--task sudoku: puzzles (default {DEFAULT_NUM}, all of --puzzles)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="sampler micro-batch (default 64; 0 = the run's sampler.batch_size)")
    parser.add_argument("--reference-num", type=int, default=None,
                        help="real rows for the real-data point (default: --num; 0 = skip)")
    parser.add_argument("--reference", choices=("heldout", "test"), default=None,
                        help="real-data rows: the corpus's held-out tail, or the first rows of the "
                             "test split (eval.test_source) (default: eval.reference, heldout)")
    parser.add_argument("--test-source", default=None,
                        help="data source of the test split for --reference test, e.g. hf:lm1b:test "
                             "(default: eval.test_source)")
    parser.add_argument("--evaluator-dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help="gpt2:DIR evaluator precision; auto = bfloat16 on accelerators, float32 "
                             "on CPU (default: eval.evaluator_dtype, auto)")
    parser.add_argument("--control", action="store_true",
                        help="also score the i.i.d.-unigram control: tokens drawn independently from "
                             "the training unigram distribution, decoded and scored like samples")
    parser.add_argument("--ar-run", help="also score an AR baseline run at --ar-temperatures")
    parser.add_argument("--ar-temperatures", type=_floats, default=[1.0])
    parser.add_argument("--out-dir", "--out", help="output directory (default: <run-dir>/eval, "
                                                   "<run-dir>/eval/sudoku for --task sudoku, "
                                                   "./eval without a run)")
    sudoku = parser.add_argument_group("--task sudoku")
    sudoku.add_argument("--puzzles", metavar="FILE",
                        help="puzzles to solve, one per line: 81 digits (0 = blank), optionally a "
                             "space and the solution (default: the first --num validation puzzles)")
    sudoku.add_argument("--nfe", type=int, default=None,
                        help=f"CoBit network calls per solution (default {DEFAULT_NFE})")
    sudoku.add_argument("--gamma", type=_floats, default=None,
                        help="CoBit churn γ, comma-separated: one row per value (default: the run's "
                             "sampler.gamma)")


def _config_seeds(text: str) -> list[int]:
    from bitgen.config import ConfigError

    try:
        return _ints(text)
    except ValueError:
        raise ConfigError(f"eval.seeds={text!r} must be comma-separated integers, e.g. 42,43,44") from None


def protocol(args: argparse.Namespace, spec) -> argparse.Namespace:
    """``args`` with every protocol flag left unset filled from the run's ``eval`` section ``spec``."""
    return argparse.Namespace(**{
        **vars(args),
        "num": spec.num if args.num is None else args.num,
        "seeds": _config_seeds(spec.seeds) if args.seeds is None else args.seeds,
        "sweep": spec.sweep if args.sweep is None else args.sweep,
        "reference": args.reference or spec.reference,
        "test_source": args.test_source or spec.test_source,
        "evaluator_dtype": args.evaluator_dtype or spec.evaluator_dtype,
    })


def evaluate(args: argparse.Namespace, log=print) -> tuple[list[dict], int | None]:
    """Run the sweep of parsed ``bitgen eval`` arguments.

    Returns (aggregated table, signal number when a signal stopped it early, else None).
    """
    from bitgen.preemption import PreemptionFlag
    from bitgen.eval.controls import unigram_control
    from bitgen.eval.plot import plot_frontier
    from bitgen.eval.sweep import load_evaluator, parse_sweep, reference_point, run_sweep
    from bitgen.eval.table import aggregate, describe_point, format_table, write_csv
    from bitgen.generation import check_guidance
    from bitgen.loading import SampleError, load_model

    model = load_model_from_args(args)
    log(f"model: {model.source} (step {model.step})")
    if _task(args, model) == "sudoku":
        return evaluate_sudoku(args, model, log)
    check_guidance(model, model.cfg.sampler, conditioned=False)  # before the evaluator loads
    if args.evaluator is None:
        raise SampleError("bitgen eval --task text needs --evaluator: an AR run directory, "
                          "gpt2:DIR, or none")
    args = protocol(args, model.cfg.eval)
    points = parse_sweep(args.sweep)
    out_dir = Path(args.out_dir) if args.out_dir else (model.run / "eval" if model.run else Path("eval"))
    results = out_dir / "results.jsonl"
    log(f"evaluator: {args.evaluator}")
    evaluator = (None if args.evaluator == "none"
                 else load_evaluator(args.evaluator, args.evaluator_dtype))
    rows = []
    reference_num = args.num if args.reference_num is None else args.reference_num
    if reference_num and evaluator is not None:
        rows.append(reference_point(model, evaluator, reference_num, results, args.reference,
                                    args.test_source))
        log(f"  real data ({rows[-1]['n']} {describe_point(rows[-1])}): GenPPL "
            f"{rows[-1]['genppl']:.2f}, entropy {rows[-1]['entropy']:.3f}")
    if args.control and evaluator is not None:
        rows += unigram_control(model.rows, evaluator, results, seeds=args.seeds, num=args.num)
    with PreemptionFlag() as flag:
        log(f"sweep: {len(points)} sampler settings × {len(args.seeds)} seeds × {args.num} samples")
        # An AR --run-dir is swept at --temperature/--top-p (CoBit runs ignore both).
        rows += run_sweep(model, evaluator, results, points=points, seeds=args.seeds, num=args.num,
                          temperatures=(args.temperature,), top_p=args.top_p,
                          batch_size=args.batch_size, flag=flag, progress=not args.no_progress, log=log)
        if args.ar_run and not flag.requested:
            ar_model = load_model(args.ar_run, weights=args.weights)
            rows += run_sweep(ar_model, evaluator, results, seeds=args.seeds, num=args.num,
                              temperatures=args.ar_temperatures, top_p=args.top_p,
                              batch_size=args.batch_size, flag=flag, progress=not args.no_progress,
                              log=log)
    if evaluator is None:
        log(f"drew the samples into {out_dir / 'samples'}; score them with --evaluator")
        return [], flag.signum
    table = aggregate(rows)
    write_csv(table, out_dir / "table.csv")
    plot_frontier(table, out_dir / "frontier.png")
    log(format_table(table))
    log(f"wrote {results}, {out_dir / 'table.csv'}, {out_dir / 'frontier.png'}")
    return table, flag.signum


def _task(args: argparse.Namespace, model) -> str:
    """The evaluation ``args`` ask for on ``model``; refuses flags of the other task."""
    from bitgen.eval.sudoku_run import SudokuEvalError, is_sudoku_run

    sudoku_run = is_sudoku_run(model.cfg)
    task = args.task or ("sudoku" if sudoku_run else "text")
    if task == "text" and sudoku_run:
        raise SudokuEvalError(f"{model.source} is a Sudoku run: text metrics (GenPPL) mean nothing "
                              "there; use --task sudoku")
    if task == "text":
        given = [flag for flag, value in (("--puzzles", args.puzzles), ("--nfe", args.nfe),
                                          ("--gamma", args.gamma)) if value is not None]
        if given:
            raise SudokuEvalError(f"{', '.join(given)} apply to --task sudoku; for a text run "
                                  "give the sampler grid with --sweep")
    else:
        given = [flag for flag, value in (("--sweep", args.sweep), ("--control", args.control),
                                          ("--ar-run", args.ar_run)) if value]
        if given:
            raise SudokuEvalError(f"{', '.join(given)} apply to --task text; --task sudoku takes "
                                  "--gamma/--nfe, and an AR Sudoku run is evaluated with its own "
                                  "--run-dir")
        if args.num is not None and args.num < 1:
            raise SudokuEvalError(f"--num must be >= 1 puzzles, got {args.num}")
    return task


def evaluate_sudoku(args: argparse.Namespace, model, log=print) -> tuple[list[dict], int | None]:
    """``--task sudoku``: solve, score per difficulty, write metrics and predictions."""
    from bitgen.eval.sudoku import read_puzzles
    from bitgen.eval.sudoku_run import (
        check_points,
        check_sudoku_model,
        evaluate_points,
        operating_points,
        validation_puzzles,
        write_report,
    )
    from bitgen.generation import guidance_note, sampling_options
    from bitgen.preemption import PreemptionFlag

    check_sudoku_model(model)
    temperature, top_p = sampling_options(model, args.temperature, args.top_p)
    points = operating_points(model, nfe=args.nfe or DEFAULT_NFE, gammas=args.gamma,
                              temperature=temperature, top_p=top_p)
    check_points(model, points)  # before any puzzle is read or built
    if args.puzzles:
        puzzles, solutions = read_puzzles(args.puzzles)
        puzzles, solutions = (puzzles, solutions) if args.num is None else (
            puzzles[:args.num], None if solutions is None else solutions[:args.num])
        source = args.puzzles
    else:
        puzzles, solutions = validation_puzzles(model.cfg, args.num or DEFAULT_NUM)
        source = "validation split"
    out_dir = Path(args.out_dir) if args.out_dir else (
        model.run / "eval" / "sudoku" if model.run else Path("eval") / "sudoku")
    seeds = args.seeds or [0]
    batch_size = args.batch_size or model.cfg.sampler.batch_size
    log(f"sudoku: {len(puzzles)} puzzles ({source}{'' if solutions is not None else ', no solutions'}) "
        f"× {len(points)} points × {len(seeds)} seeds, batches of {batch_size}")
    if (note := guidance_note(points[0].sampler_cfg)) is not None and model.task != "ar":
        log(note)
    with PreemptionFlag() as flag:
        rows = evaluate_points(model, points, puzzles, solutions, seeds=seeds, batch_size=batch_size,
                               out_dir=out_dir, progress=not args.no_progress, flag=flag, log=log)
    header = {"run": model.source, "step": model.step, "task": model.task, "puzzles": source,
              "n": len(puzzles), "solutions": solutions is not None}
    metrics, table = write_report(rows, out_dir, header, log=log)
    log(f"wrote {metrics}, {table} and the predictions in {out_dir}")
    return rows, flag.signum


def run(args: argparse.Namespace) -> int:
    """bitgen's own errors propagate to ``bitgen.cli``, which prints them as one line (exit 2)."""
    _, signum = evaluate(args)
    if signum is not None:
        print("bitgen eval: stopped by a signal; finished points are written (a text sweep's "
              "re-run continues from results.jsonl)", file=sys.stderr)
        return 128 + signum
    return 0
