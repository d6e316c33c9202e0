"""CoBit-S on LM1B (spec §1.1, §2, §4.5): BERT ids (P=15), 128 tokens, 12x768, 1M steps at batch 512.

Evaluation (spec §6, docs/evaluation.md): ``eval`` holds the paper's protocol, so
``bitgen eval --run-dir runs/cobit_s_lm1b --evaluator gpt2:DIR`` (DIR: a local copy of
openai-community/gpt2-large) scores 1024 samples per point for seeds 42-51 at the headline
points (PF-ODE, γ 0.185 and 0.2 at 256 NFE, full band), next to the first 1024 rows of the LM1B
test split, with GPT-2 Large in bf16 on an accelerator. Add ``--batch-size 512`` for the paper's
generation micro-batch.
"""

from bitgen.config import (
    DataConfig,
    EvalConfig,
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
        eval=EvalConfig(num=1024, seeds="42,43,44,45,46,47,48,49,50,51", reference="test",
                        test_source="hf:lm1b:test",
                        sweep="name=ddim grid=entropic nfe=256 gamma=0,0.185,0.2"),
    )
