"""CoBit-S on LM1B (spec §1.1, §2, §4.5): BERT ids (P=15), 128 tokens, 12x768, 1M steps at batch 512."""

from bitgen.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    SamplerConfig,
    TrainConfig,
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="cobit_s_lm1b",
        model=ModelConfig(patch_size=15, seq_tokens=128, embed_dim=768, n_heads=12, n_blocks=12,
                          dim_ff=3072, compute_dtype="bfloat16"),
        data=DataConfig(source="hf:lm1b", tokenizer="bert-base-uncased", vocab_size=30522,
                        packing="sep", code_policy="modulo", batch_size=512),
        optim=OptimConfig(lr=3e-4, warmup_steps=2500, min_lr=1e-6),
        sampler=SamplerConfig(nfe=256, gamma=0.2),
        train=TrainConfig(steps=1_000_000, log_every=100, ckpt_every=50_000, run_dir="runs/cobit_s_lm1b"),
    )
