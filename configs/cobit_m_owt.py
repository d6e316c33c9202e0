"""CoBit-M on OpenWebText (spec §2, §4.5): 24x1024, 16 heads, lr 2e-4, warm-up 5000."""

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
        name="cobit_m_owt",
        model=ModelConfig(patch_size=16, seq_tokens=1024, embed_dim=1024, n_heads=16, n_blocks=24,
                          dim_ff=4096, compute_dtype="bfloat16"),
        # Second-stage codes: the released gpt2id_bpe16 tokenizer (HF Hub gbatzolis/CoBit,
        # tokenizer/); download it and point data.code_tokenizer at it.
        data=DataConfig(source="hf:openwebtext", tokenizer="gpt2", vocab_size=65536,
                        code_tokenizer="tokenizer_gpt2id_bpe16_65536_base1024.json",
                        packing="window", code_policy="stop", batch_size=512),
        optim=OptimConfig(lr=2e-4, warmup_steps=5000, min_lr=1e-6),
        sampler=SamplerConfig(nfe=256, gamma=0.21),
        train=TrainConfig(steps=1_000_000, log_every=100, ckpt_every=50_000, run_dir="runs/cobit_m_owt"),
    )
