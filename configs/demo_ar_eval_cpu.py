"""A larger AR model on the demo corpus, used as the GenPPL evaluator of the CPU demos.

Same data as ``demo_cpu`` (8192-token BPE, 32 tokens per row) so it scores their samples in the
same token space; 4 blocks of width 192 with batch 48, trained for ~5 minutes on 2 CPU cores.
Dropout regularises it: the fortunes corpus is small and the evaluator must not just memorise it.
"""

import dataclasses

from bitgen.config import (
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)


def get_config() -> ExperimentConfig:
    demo = load_config("demo_cpu")
    return dataclasses.replace(
        demo,
        name="demo_ar_eval_cpu",
        task="ar",
        model=ModelConfig(patch_size=13, seq_tokens=32, embed_dim=192, n_heads=6, n_blocks=4,
                          dim_ff=576, dropout=0.1),
        data=dataclasses.replace(demo.data, batch_size=48),
        optim=OptimConfig(lr=1e-3, warmup_steps=50, min_lr=5e-5, ema_decay=0.99),
        train=TrainConfig(steps=500, log_every=25, ckpt_every=250, keep_checkpoints=2,
                          sample_every=250, run_dir="runs/demo_ar_eval_cpu"),
    )
