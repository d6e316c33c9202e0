"""BitLM for ``demo_cpu``: the same corpus, tokenizer, codes, trunk sizes and budget.

The backbone has the SDT's width/depth/heads (embed 128, 4 heads, 2 blocks) over the same
8192-token BPE ids (32 per row = 8 blocks of m = 4), with block-causal attention; a 2-block,
width-128 diffusion head generates each block's 4 × 13 frequency-rank code bits jointly. Sampling
defaults follow the spec (K = 15 Euler steps per block, CFG 9.0); see docs/bitlm.md.
"""

import dataclasses

from bitgen.config import ExperimentConfig, load_config
from bitgen.families.bitlm import BitLMOptions


def get_config() -> ExperimentConfig:
    cobit = load_config("demo_cpu")
    return dataclasses.replace(
        cobit,
        name="demo_bitlm_cpu",
        task="bitlm",
        family=BitLMOptions(head_width=128, head_depth=2, head_heads=4),
        train=dataclasses.replace(cobit.train, run_dir="runs/demo_bitlm_cpu"),
    )
