"""CoBit-M on OpenWebText (spec §2, §4.5): CoBit-S OWT with a 24x1024 trunk, 16 heads, dim_ff 4096,
lr 2e-4 and a 5000-step warm-up; evaluated with gamma 0.21 at 256 NFE in the paper.

Evaluation: CoBit-S OWT's protocol (1024 samples, seeds 42-51, the held-out OWT documents, GPT-2
Large in bf16) at the paper's CoBit-M points: γ 0.13 and 0.21 at 256 NFE, 0.24 at 384, 0.26 at
512 (full band); ``--batch-size 64`` is the paper's generation micro-batch.
"""

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
        eval=dataclasses.replace(small.eval, sweep="name=ddim grid=entropic nfe=256 gamma=0.13,0.21; "
                                                   "name=ddim grid=entropic nfe=384 gamma=0.24; "
                                                   "name=ddim grid=entropic nfe=512 gamma=0.26"),
    )
