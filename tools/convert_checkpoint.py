"""Convert official CoBit PyTorch checkpoints to bitgen params and back.

Usage: python tools/convert_checkpoint.py ckpt.pt params.npz [--official-config cfg.json]
       python tools/convert_checkpoint.py params.npz official.npz --to official
(the same as ``bitgen convert ...``).
"""

from __future__ import annotations

import argparse
import sys

from bitgen import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    convert.add_arguments(parser)
    return convert.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
