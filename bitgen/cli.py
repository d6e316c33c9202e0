"""The ``bitgen`` command line: one subcommand per module that owns the job.

Each entry of ``COMMANDS`` names a module that defines ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so ``bitgen --help``
stays fast and JAX starts only when needed.

Exit status, the same for every command:

* 0: success.
* 2: bad input, a usage error or a refused request. bitgen's errors (``bitgen.errors.BitgenError``)
  are printed as one line naming the problem and the fix (``BITGEN_TRACEBACK=1`` shows the
  traceback); argparse usage errors print the usage and the error.
* 128 + N: stopped by signal N (SIGTERM: 143, SIGINT: 130) at a safe point after saving what was
  done; re-running the same command continues.
* 1: any other exception. That is a bug, reported with Python's traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import re
import sys

from bitgen.errors import BitgenError
from bitgen.host_memory import keep_freed_host_memory

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "convert": ("bitgen.convert", "convert official CoBit PyTorch checkpoints to bitgen params and back"),
    "data": ("bitgen.data.cli", "build/inspect a tokenised, packed dataset and print its statistics"),
    "train": ("bitgen.train.cli", "train a CoBit model (or the AR baseline with task=ar)"),
    "sample": ("bitgen.eval.sample_cli", "draw samples from a trained run (CoBit or AR) to text + JSONL"),
    "eval": ("bitgen.eval.cli", "sweep samplers x NFE x gamma: GenPPL/entropy table, CSV and frontier plot"),
    "export": ("bitgen.export", "write a trained run as a model folder: safetensors weights, config, tokenizer"),
    "demo": ("bitgen.demo", "train CoBit, AR and an evaluator on the embedded corpus and compare them"),
    "bench": ("bitgen.bench.cli", "measure throughput, sampler overhead and head memory"),
}

# Commands that run compiled programs step after step: the ones bitgen.host_memory speeds up.
# The others (data: multi-threaded tokenisation; convert, export) keep glibc's arenas.
STEPPING_COMMANDS = frozenset({"train", "sample", "eval", "demo", "bench"})


def _drop_closed_loop_noise(hook):
    """``sys.unraisablehook`` without the leftovers of a failed orbax restore: the read coroutines
    orbax abandons and the "Event loop is closed" reports of TensorStore callbacks completing after
    its event loop has gone. The failure itself is reported as one line; these would add dozens of
    tracebacks (BITGEN_TRACEBACK=1 keeps them)."""

    def filtered(unraisable) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        orbax_read = inspect.iscoroutine(obj) and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename
        if not (closed_loop or orbax_read):
            hook(unraisable)

    return filtered


_UNRETRIEVED = re.compile(r"^\w+ exception was never retrieved")  # Task, Future, _GatheringFuture
# What names a checkpoint read in the report: an orbax coroutine's file, TensorStore's own errors.
_CHECKPOINT_READ = (f"{os.sep}orbax{os.sep}", "TensorStore", "OCDBT")


def _not_an_abandoned_checkpoint_read(record: logging.LogRecord) -> bool:
    """``asyncio`` logger filter: False for "... exception was never retrieved" about an orbax or
    TensorStore read (a task, a future or a gathering of them). asyncio logs these (not through
    ``sys.unraisablehook``) whenever the garbage collector reaches a read orbax abandoned after a
    failed restore, so their number and timing vary from run to run; the failure itself is
    already reported as one line."""
    message = record.getMessage()
    return not (_UNRETRIEVED.match(message) and any(m in message for m in _CHECKPOINT_READ))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(
        prog="bitgen",
        description=__doc__.splitlines()[0],
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", choices=sorted(COMMANDS), help="what to do")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command = top.parse_args(argv[:1]).command
    if command in STEPPING_COMMANDS:
        keep_freed_host_memory()  # before JAX starts its CPU threads (see bitgen.host_memory)
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"bitgen {command}", description=help_text)
    module.add_arguments(parser)
    # Intermixed parsing lets `key=value` overrides and --flags come in any order.
    args = parser.parse_intermixed_args(argv[1:])
    if not os.environ.get("BITGEN_TRACEBACK"):
        sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
        logging.getLogger("asyncio").addFilter(_not_an_abandoned_checkpoint_read)
    try:
        return int(module.run(args) or 0)
    except BitgenError as err:
        # The message names the problem and the fix; anything else is a bug and keeps its traceback.
        if os.environ.get("BITGEN_TRACEBACK"):
            raise
        print(f"bitgen {command}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
