"""Run every parity check against a CoBit fixture directory.

Usage: python tools/parity.py ../shared/reference/cobit [--suite model --suite grids] [--report FILE.md]
Prints one line per check (max abs / relative error) and exits non-zero on any failure;
``--report`` also writes the results as a Markdown table.
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
    parser.add_argument("--report", type=Path, help="also write a Markdown table of the results")
    args = parser.parse_args(argv)
    if not args.fixture_dir.is_dir():
        print(f"error: {args.fixture_dir} is not a directory", file=sys.stderr)
        return 2
    failures = total = 0
    rows = []
    for suite in args.suite or SUITES:
        module = importlib.import_module(f"bitgen.parity.{suite}")
        print(f"== {suite}")
        for result in module.checks(args.fixture_dir):
            total += 1
            failures += not result.passed
            print(result.line(), flush=True)
            rows.append((suite, result))
    print(f"{total - failures} passed, {failures} failed")
    if args.report:
        write_report(args.report, args.fixture_dir, rows, total, failures)
    return 1 if failures else 0


def write_report(path: Path, fixture_dir: Path, rows, total: int, failures: int) -> None:
    """Markdown table: suite, check, status, max abs error, max relative error, note."""
    lines = [f"Fixture directory: `{fixture_dir}` — {total - failures} passed, {failures} failed.",
             "", "| suite | check | status | max abs | max rel | note |", "|---|---|---|---|---|---|"]
    for suite, r in rows:
        status = "PASS" if r.passed else "FAIL"
        note = r.note.replace("|", "/")
        lines.append(f"| {suite} | `{r.name}` | {status} | {r.max_abs:.2e} | {r.max_rel:.2e} | {note} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
