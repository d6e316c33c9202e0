"""CoBit-S on OpenWebText (spec §1.2, §2, §4.5): 16-bit second-stage codes, 1024 tokens, 12x768.

Trained on a 1M-step cosine schedule and evaluated at 750K in the paper.
"""

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
        name="cobit_s_owt",
        model=ModelConfig(patch_size=16, seq_tokens=1024, embed_dim=768, n_heads=12, n_blocks=12,
                          dim_ff=3072, compute_dtype="bfloat16"),
        # Second-stage codes: the released gpt2id_bpe16 tokenizer (HF Hub gbatzolis/CoBit,
        # tokenizer/); download it and point data.code_tokenizer at it.
        data=DataConfig(source="hf:openwebtext", tokenizer="gpt2", vocab_size=65536,
                        code_tokenizer="tokenizer_gpt2id_bpe16_65536_base1024.json",
                        packing="window", code_policy="stop", batch_size=512),
        optim=OptimConfig(lr=3e-4, warmup_steps=2500, min_lr=1e-6),
        sampler=SamplerConfig(nfe=256, gamma=0.13),
        # keep_every: the paper evaluates the 750K checkpoint, which keeping only the latest 3
        # would delete; every 50K step is kept (CoBit-M inherits this).
        train=TrainConfig(steps=1_000_000, log_every=100, ckpt_every=50_000, keep_every=50_000,
                          run_dir="runs/cobit_s_owt"),
    )
