"""``bitgen demo``: the whole CoBit story on the embedded corpus, on a laptop CPU, in one command.

Stages (each prints what it does; finished work in ``--work-dir`` is reused, so an interrupted
demo continues where it stopped — training resumes from its last checkpoint, scored points are
read back from ``eval/results.jsonl``):

1. train a small CoBit (``configs/demo_cpu.py``)            -> <work>/cobit
2. train a same-size AR baseline (``configs/demo_ar_cpu.py``) -> <work>/ar
3. train a larger AR evaluator (``configs/demo_ar_eval_cpu.py``) -> <work>/ar_eval
4. sample CoBit (deterministic PF-ODE and stochastic churn at the config's NFE) and AR, score
   GenPPL under the evaluator and unigram entropy, add the held-out real-data row and the
   i.i.d.-unigram control (tokens drawn independently from the training unigram distribution,
   decoded and scored like samples: a generator must beat it to show it learned context)
5. print the table; write <work>/eval/{results.jsonl,table.csv,frontier.png}; then one prompted
   continuation per model (CoBit clamps the prompt's bits, AR continues its ids) of ``DemoPlan.prompt``
   (default ``"The"``), printed and written to <work>/eval/prompted_{cobit,ar}.txt (+ .jsonl)

``--families bitlm,bitlm_softmax,block_cobit`` adds the block-causal families of ``FAMILIES`` at the
same training budget (their configs take ``demo_cpu``'s data, trunk and optimiser): each is trained in
``<work>/<name>`` after stage 3, sampled and scored into the same table (rows and samples cached in
``<work>/<name>/eval``), and continues the prompt.

``--quick`` is a smoke version (a few training steps, a handful of samples, Karras grid because
so short a run has not learned an entropy table yet) in ``runs/demo_quick``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from bitgen.config import ConfigError

# (stage name, config, sub-directory, what it is)
STAGES = (
    ("cobit", "demo_cpu", "cobit", "small CoBit bitstream-diffusion model"),
    ("ar", "demo_ar_cpu", "ar", "same-size autoregressive baseline"),
    ("evaluator", "demo_ar_eval_cpu", "ar_eval", "larger AR model used as the GenPPL evaluator"),
)

# Families ``--families`` can add: name -> (config, its overrides, what it is).
FAMILIES = {
    "bitlm": ("demo_bitlm_cpu", (), "BitLM (block-causal backbone + bitwise diffusion head)"),
    "bitlm_softmax": ("demo_bitlm_cpu", ("family.head=softmax",),
                      "BitLM's same-backbone softmax-head control"),
    "block_cobit": ("demo_block_cobit_cpu", (), "block CoBit (CoBit's SDT block by block)"),
}

# How many of the embedded fortunes begin. No trailing space: byte-level BPE would encode it as a
# lone-space token, which the corpus never has before a word (" cat" is one token).
DEMO_PROMPT = "The"


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Everything the demo will do; ``plan(quick)`` builds it (pure, so tests can inspect it)."""

    work_dir: Path
    train_overrides: tuple[str, ...]  # applied to every training config
    sampler_points: tuple[tuple[str, ...], ...]  # CoBit sampler override sets to score
    seeds: tuple[int, ...]
    num: int
    ar_temperatures: tuple[float, ...]
    prompt: str = DEMO_PROMPT  # the prompted continuation shown after the table
    families: tuple[str, ...] = ()  # names in FAMILIES, trained and scored after the three stages

    def stages(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """(sub-directory, config, overrides, what it is) of every run the demo trains."""
        return ([(sub, config, self.train_overrides, what) for _, config, sub, what in STAGES]
                + [(name, FAMILIES[name][0], self.train_overrides + FAMILIES[name][1], FAMILIES[name][2])
                   for name in self.families])


def plan(quick: bool, work_dir: str | None = None, *, seeds: tuple[int, ...] | None = None,
         num: int | None = None, families: tuple[str, ...] = ()) -> DemoPlan:
    """The demo's stages as data: full (minutes on 2 cores) or ``quick`` (a smoke test)."""
    unknown = [name for name in families if name not in FAMILIES]
    if unknown:
        raise ConfigError(f"--families {','.join(unknown)}: not a demo family; choose from "
                          f"{','.join(FAMILIES)}")
    return dataclasses.replace(_plan(quick, work_dir, seeds=seeds, num=num),
                               families=tuple(dict.fromkeys(families)))


def _plan(quick: bool, work_dir: str | None, *, seeds: tuple[int, ...] | None,
          num: int | None) -> DemoPlan:
    if quick:
        return DemoPlan(
            work_dir=Path(work_dir or "runs/demo_quick"),
            train_overrides=("train.steps=12", "train.ckpt_every=12", "train.log_every=4",
                             "optim.warmup_steps=4", "train.sample_every=0"),
            sampler_points=(("sampler.grid=karras", "sampler.nfe=8", "sampler.gamma=0"),
                            ("sampler.grid=karras", "sampler.nfe=8", "sampler.gamma=0.2")),
            seeds=seeds or (0,), num=num or 8, ar_temperatures=(1.0,))
    # The configs' own NFE/γ: the deterministic PF-ODE against the headline stochastic sampler.
    return DemoPlan(
        work_dir=Path(work_dir or "runs/demo"), train_overrides=(),
        sampler_points=(("sampler.gamma=0",), ()),
        seeds=seeds or (0, 1, 2), num=num or 64, ar_temperatures=(1.0,))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", help="where runs and results go (default runs/demo, "
                                           "runs/demo_quick with --quick); reused on re-runs")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (about a minute)")
    parser.add_argument("--seeds", type=lambda s: tuple(int(v) for v in s.split(",") if v),
                        help="sampling seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--num", type=int, help="samples per point and seed (default 64; --quick: 8)")
    parser.add_argument("--families", type=lambda s: tuple(v for v in s.split(",") if v), default=(),
                        help=f"also train and score these families at the same budget: "
                             f"{','.join(FAMILIES)} (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _say(message: str) -> None:
    print(message, flush=True)


def train_stage(config: str, run_dir: Path, overrides: tuple[str, ...], *, flag, progress: bool) -> bool:
    """Train (or resume, or find finished) one run; returns False when a signal stopped it."""
    from bitgen.checkpoint import IncompatibleCheckpointError
    from bitgen.config import load_config
    from bitgen.train.loop import train

    cfg = load_config(config, list(overrides))
    try:
        result = train(cfg, run_dir, resume=True, flag=flag, progress=progress)
    except IncompatibleCheckpointError as err:
        raise IncompatibleCheckpointError(
            f"{run_dir} holds a run of an earlier demo version ({err}); delete {run_dir.parent} "
            "or pass another --work-dir"
        ) from err
    return not result.preempted


def run_demo(p: DemoPlan, *, progress: bool = True, log=_say) -> tuple[list[dict], int | None]:
    """Run the plan; returns (aggregated table, signal number if interrupted else None)."""
    import logging

    from bitgen.preemption import PreemptionFlag
    from bitgen.eval.controls import unigram_control
    from bitgen.eval.plot import plot_frontier
    from bitgen.loading import load_model
    from bitgen.eval.sweep import load_evaluator, reference_point, run_sweep
    from bitgen.eval.table import aggregate, format_table, write_csv

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stages = p.stages()
    total = len(stages) + 2
    started = time.perf_counter()
    with PreemptionFlag() as flag:
        for i, (sub, config, overrides, what) in enumerate(stages, 1):
            extra = "".join(f" {o}" for o in overrides[len(p.train_overrides):])
            log(f"[{i}/{total}] training the {what} (configs/{config}.py{extra}) in {p.work_dir / sub} "
                f"[{time.perf_counter() - started:.0f} s]")
            if not train_stage(config, p.work_dir / sub, overrides, flag=flag, progress=progress):
                log("stopped by a signal after saving a checkpoint; re-run the same command to continue")
                return [], flag.signum
        log(f"[{total - 1}/{total}] sampling and scoring ({len(p.seeds)} seeds × {p.num} samples per "
            f"point) [{time.perf_counter() - started:.0f} s]")
        results = p.work_dir / "eval" / "results.jsonl"
        cobit = load_model(str(p.work_dir / "cobit"))
        evaluator = load_evaluator(str(p.work_dir / "ar_eval"))
        rows = [reference_point(cobit, evaluator, p.num, results)]
        rows += unigram_control(cobit.rows, evaluator, results, seeds=p.seeds, num=p.num)
        rows += run_sweep(cobit, evaluator, results, points=p.sampler_points, seeds=p.seeds,
                          num=p.num, batch_size=p.num, flag=flag, progress=progress, log=log)
        ar = load_model(str(p.work_dir / "ar"))
        rows += run_sweep(ar, evaluator, results, seeds=p.seeds, num=p.num,
                          temperatures=p.ar_temperatures, batch_size=p.num, flag=flag,
                          progress=progress, log=log)
        extras = {name: load_model(str(p.work_dir / name)) for name in p.families}
        for name, model in extras.items():
            # In the run's own eval/ (as `bitgen eval` writes it): runs of one family at the same
            # settings (BitLM and its softmax control) must not share cached samples or rows. A
            # sampler-swept family is drawn at the headline point, as CoBit is.
            rows += run_sweep(model, evaluator, p.work_dir / name / "eval" / "results.jsonl",
                              points=p.sampler_points[-1:], seeds=p.seeds, num=p.num,
                              batch_size=p.num, flag=flag, progress=progress, log=log)
        if flag.requested:
            log("stopped by a signal; scored points are kept, re-run the same command to continue")
            return [], flag.signum
    table = aggregate(rows)
    write_csv(table, p.work_dir / "eval" / "table.csv")
    plot_frontier(table, p.work_dir / "eval" / "frontier.png",
                  title="bitgen demo: CoBit vs AR on the embedded corpus")
    log(f"[{total}/{total}] results (GenPPL under {evaluator.name}; entropy in nats; mean ± std "
        f"over seeds) [{time.perf_counter() - started:.0f} s]")
    log(format_table(table))
    log(f"table: {p.work_dir / 'eval' / 'table.csv'}   plot: {p.work_dir / 'eval' / 'frontier.png'}")
    show_prompted(p, {"cobit": cobit, "ar": ar, **extras}, log=log)
    return table, None


def show_prompted(p: DemoPlan, models: dict, *, seed: int = 0, log=_say) -> dict:
    """Draw and print one continuation of ``p.prompt`` per model (seed ``seed``; CoBit with the
    plan's last sampler point, the headline sampler), written to ``<work>/eval/prompted_<name>.txt``
    (+ .jsonl); returns {name: Sample}."""
    from bitgen.config import apply_overrides
    from bitgen.generation import generate, sampler_settings_dict, sampling_options, write_samples
    from bitgen.prompts import prefix_prompt

    log(f"one prompted continuation per model of {p.prompt!r} (seed {seed}):")
    shown = {}
    for name, model in models.items():
        sampler_cfg = apply_overrides(model.cfg, list(p.sampler_points[-1])).sampler
        layout = prefix_prompt(model.text, p.prompt, model.cfg.model.seq_tokens)
        (sample,) = generate(model, 1, seed, sampler_cfg, prompt=layout, progress=False)
        temperature, top_p = sampling_options(model, None, None)
        write_samples([sample], p.work_dir / "eval" / f"prompted_{name}.txt",
                      sampler_settings_dict(model, sampler_cfg, temperature=temperature, top_p=top_p))
        log(f"  {name}: {sample.text!r}")
        shown[name] = sample
    return shown


def run(args: argparse.Namespace) -> int:
    """bitgen's own errors propagate to ``bitgen.cli``, which prints them as one line (exit 2)."""
    p = plan(args.quick, args.work_dir, seeds=args.seeds, num=args.num, families=args.families)
    _, signum = run_demo(p, progress=not args.no_progress)
    return 128 + signum if signum is not None else 0
