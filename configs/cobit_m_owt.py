"""CoBit-M on OpenWebText (spec §2, §4.5): CoBit-S OWT with a 24x1024 trunk, 16 heads, dim_ff 4096,
lr 2e-4 and a 5000-step warm-up; evaluated with gamma 0.21 at 256 NFE in the paper."""

import dataclasses

from bitgen.config import ExperimentConfig, load_config


def get_config() -> ExperimentConfig:
    small = load_config("cobit_s_owt")
    return dataclasses.replace(
        small,
        name="cobit_m_owt",
        model=dataclasses.replace(small.model, embed_dim=1024, n_heads=16, n_blocks=24,
                                  dim_ff=4096),
        optim=dataclasses.replace(small.optim, lr=2e-4, warmup_steps=5000),
        sampler=dataclasses.replace(small.sampler, gamma=0.21),
        train=dataclasses.replace(small.train, run_dir="runs/cobit_m_owt"),
    )
