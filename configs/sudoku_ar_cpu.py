"""The autoregressive baseline for ``sudoku_cpu``: the same Sudoku rows, trunk sizes and budget.

Only ``task`` differs in substance: a causal transformer with the SDT's width/depth/heads over the
12 Sudoku ids, trained with next-token cross-entropy on the 89 solution tokens only (the prompt
``BOS puzzle BOS`` is given: the batch's ``cond_mask``). It has no σ schedule and no unconditional
branch; the entropy, sampler and ``diffusion.cond_dropout`` settings are ignored.
"""

import dataclasses

from bitgen.config import ExperimentConfig, load_config


def get_config() -> ExperimentConfig:
    cobit = load_config("sudoku_cpu")
    return dataclasses.replace(
        cobit,
        name="sudoku_ar_cpu",
        task="ar",
        train=dataclasses.replace(cobit.train, run_dir="runs/sudoku_ar_cpu"),
    )
