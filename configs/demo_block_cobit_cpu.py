"""Block CoBit for ``demo_cpu``: the same corpus, tokenizer, codes, SDT sizes, σ process, entropy
schedule, sampler and budget, with blocks of m = 4 tokens (32 tokens per row = 8 blocks).

Attention is full inside a block and causal across blocks; each block has its own σ in training;
``bitgen sample`` denoises one block at a time with demo_cpu's sampler (128 NFE per block,
churn γ = 0.2) while earlier blocks are clean context in a KV cache. See docs/block_cobit.md.
"""

import dataclasses

from bitgen.config import ExperimentConfig, load_config
from bitgen.families.block_cobit import BlockCoBitOptions


def get_config() -> ExperimentConfig:
    cobit = load_config("demo_cpu")
    return dataclasses.replace(
        cobit,
        name="demo_block_cobit_cpu",
        task="block_cobit",
        family=BlockCoBitOptions(block_tokens=4),
        train=dataclasses.replace(cobit.train, run_dir="runs/demo_block_cobit_cpu"),
    )
