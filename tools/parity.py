"""Run every parity check against a CoBit fixture directory.

Usage: python tools/parity.py ../shared/reference/cobit [--suite model --suite grids]
Prints one line per check (max abs / relative error) and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bitgen.parity import SUITES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture_dir", type=Path)
    parser.add_argument("--suite", action="append", choices=SUITES,
                        help="run only these suites (default: all)")
    args = parser.parse_args(argv)
    if not args.fixture_dir.is_dir():
        print(f"error: {args.fixture_dir} is not a directory", file=sys.stderr)
        return 2
    failures = total = 0
    for suite in args.suite or SUITES:
        module = importlib.import_module(f"bitgen.parity.{suite}")
        print(f"== {suite}")
        for result in module.checks(args.fixture_dir):
            total += 1
            failures += not result.passed
            print(result.line(), flush=True)
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
