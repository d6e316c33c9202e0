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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitgen.eval.sample_cli import add_model_arguments, add_override_argument, load_model_from_args


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_override_argument(parser)
    parser.add_argument("--evaluator", required=True,
                        help="GenPPL evaluator: an AR run directory (task=ar), gpt2:DIR, or none "
                             "(only draw and cache the samples, to score later)")
    parser.add_argument("--sweep", default=None,
                        help='sampler grid, e.g. "name=ddim,heun grid=entropic,karras nfe=32,64 '
                             'gamma=0,0.1,0.2 window_q=0:1,0.1:0.9" (default: eval.sweep, else the '
                             'run\'s sampler)')
    parser.add_argument("--seeds", type=_ints, default=None,
                        help="comma-separated seeds (default: eval.seeds, 0)")
    parser.add_argument("--num", type=int, default=None,
                        help="samples per point and seed (default: eval.num, 64; paper: 1024)")
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
    parser.add_argument("--out-dir", help="output directory (default: <run-dir>/eval, ./eval "
                                          "without a run)")


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
    from bitgen.eval.sweep import (
        aggregate,
        describe_point,
        format_table,
        load_evaluator,
        parse_sweep,
        reference_point,
        run_sweep,
        write_csv,
    )
    from bitgen.loading import load_model

    model = load_model_from_args(args)
    log(f"model: {model.source} (step {model.step})")
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


def run(args: argparse.Namespace) -> int:
    """bitgen's own errors propagate to ``bitgen.cli``, which prints them as one line (exit 2)."""
    _, signum = evaluate(args)
    if signum is not None:
        print("bitgen eval: stopped by a signal; finished points are in results.jsonl and a re-run "
              "continues from them", file=sys.stderr)
        return 128 + signum
    return 0
