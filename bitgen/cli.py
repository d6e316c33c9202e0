"""The ``bitgen`` command line: one subcommand per module that owns the job.

Each entry of ``COMMANDS`` names a module that defines ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so ``bitgen --help``
stays fast and JAX starts only when needed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
