"""The autoregressive baseline at the Sudoku reference size (``sudoku_ref`` with ``task=ar``):
the same trunk sizes, data and budget, next-token cross-entropy on the solution tokens only."""

import dataclasses

from bitgen.config import ExperimentConfig, load_config


def get_config() -> ExperimentConfig:
    ref = load_config("sudoku_ref")
    return dataclasses.replace(ref, name="sudoku_ar_ref", task="ar",
                               train=dataclasses.replace(ref.train, run_dir="runs/sudoku_ar_ref"))
