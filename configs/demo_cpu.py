"""A tiny CoBit on the embedded fortunes corpus that visibly learns in minutes on 2 CPU cores.

8192-token BPE trained on the corpus (P=13 bits/token), 32 tokens per row, a 3-block width-96
SDT, batch 32; the entropy schedule's warm-up is scaled down so the entropic sigma draws start
at step 300.
"""

from bitgen.config import (DataConfig, EntropyScheduleConfig, ExperimentConfig, ModelConfig,
                           OptimConfig, SamplerConfig, TrainConfig)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="demo_cpu",
        model=ModelConfig(patch_size=13, seq_tokens=32, embed_dim=96, n_heads=4, n_blocks=3,
                          dim_ff=256, content_dim=32, head_hidden=64, dropout=0.0),
        data=DataConfig(source="fortunes", tokenizer="bpe", vocab_size=8192, batch_size=32),
        entropy=EntropyScheduleConfig(buffer_size=20_000, min_per_bin=10, update_every=100,
                                      warmup_steps=300, transition_steps=100),
        optim=OptimConfig(lr=1e-3, warmup_steps=100, min_lr=1e-5),
        sampler=SamplerConfig(nfe=32, gamma=0.2, batch_size=4),
        train=TrainConfig(steps=1500, log_every=25, ckpt_every=250, keep_checkpoints=2,
                          sample_every=500, run_dir="runs/demo_cpu"),
    )
