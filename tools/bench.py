"""Benchmark throughput, sampler overhead and head memory (same as ``bitgen bench``).

Usage: python tools/bench.py [--out report.json] [--train cobit-s:4 small:16] [--sampler small:2]
Writes a JSON report and prints a Markdown summary; see docs/benchmarks.md.
"""

from __future__ import annotations

import sys

from bitgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
