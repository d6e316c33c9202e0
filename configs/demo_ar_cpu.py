"""The autoregressive baseline for ``demo_cpu``: the same corpus, tokenizer, sizes and budget.

Only ``task`` differs in substance: a causal transformer with the SDT's width/depth/heads over the
same 8192-token BPE ids (32 per row), trained with next-token cross-entropy. It has no sigma
schedule; the entropy settings are ignored.
"""

import dataclasses

from bitgen.config import ExperimentConfig, load_config


def get_config() -> ExperimentConfig:
    cobit = load_config("demo_cpu")
    return dataclasses.replace(
        cobit,
        name="demo_ar_cpu",
        task="ar",
        train=dataclasses.replace(cobit.train, run_dir="runs/demo_ar_cpu"),
    )
