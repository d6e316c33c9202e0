"""``bitgen train``: train a CoBit (or, with ``task=ar``, an AR baseline) model from a config,
resumable and preemption-safe.

Examples::

    bitgen train --config demo_cpu
    bitgen train --config demo_ar_cpu          # the same-size autoregressive baseline
    bitgen train --config cobit_s_lm1b optim.lr=2e-4 --run-dir runs/lm1b --resume
    # multi-host (one command per host; or let JAX detect TPU/SLURM with --multihost):
    bitgen train --config cobit_s_owt --coordinator host0:1234 --num-processes 4 --process-id $I

On SIGTERM/SIGINT the run checkpoints at the next step boundary and exits with 128+signal, so a
scheduler can requeue it with ``--resume``. A damaged checkpoint stops ``--resume`` with one line;
``--resume-fallback`` continues from the newest good step and ``--resume-from STEP`` from a chosen
one, renaming the later steps aside (``<step>.damaged-<time>`` / ``.superseded-<time>``).
One process writes a run directory at a time (a second one stops, naming the holder).
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/<name>.py name or a .py/.json path")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. model.embed_dim=64 train.steps=1000")
    parser.add_argument("--run-dir", help="output directory (default: train.run_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--resume-fallback", action="store_true",
                        help="with --resume: skip damaged checkpoints for the newest good one (the "
                             "damaged steps are renamed aside, never deleted)")
    parser.add_argument("--resume-from", type=int, metavar="STEP",
                        help="continue from this checkpoint step (implies --resume); later steps "
                             "are renamed aside")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    group = parser.add_argument_group("multi-process")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordination service")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--multihost", action="store_true",
                       help="let JAX detect the cluster (TPU pod, SLURM, Open MPI) and start it")


def run(args: argparse.Namespace) -> int:
    from bitgen import parallel
    from bitgen.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Before any other JAX call: jax.distributed must start first.
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                    auto=args.multihost)
    cfg = load_config(args.config, args.overrides)

    from bitgen.preemption import PreemptionFlag
    from bitgen.train.loop import train

    # bitgen's errors (config, checkpoint, lock, non-finite loss) reach `bitgen.cli`, which prints
    # them as one line with exit status 2.
    with PreemptionFlag() as flag:
        result = train(cfg, args.run_dir or cfg.train.run_dir, resume=args.resume,
                       resume_fallback=args.resume_fallback, resume_from=args.resume_from,
                       flag=flag, progress=not args.no_progress)
    if result.preempted:
        return 128 + (flag.signum or 15)
    return 0
