"""CoBit-S on OpenWebText (spec §1.2, §2, §4.5): 16-bit second-stage codes, 1024 tokens, 12x768.

Trained on a 1M-step cosine schedule and evaluated at 750K in the paper.

Evaluation (spec §6, docs/evaluation.md): ``eval`` holds the paper's protocol, so
``bitgen eval --run-dir runs/cobit_s_owt --evaluator gpt2:DIR`` (DIR: a local copy of
openai-community/gpt2-large) scores 1024 samples per point for seeds 42-51 at the paper's points
(PF-ODE, γ 0.13, 0.175, 0.18 at 256 NFE, full band), next to the first 1024 rows of the held-out
last 100,000 OpenWebText documents (OWT has no test split), with GPT-2 Large in bf16 on an
accelerator; entropy counts the GPT-2 ids the codes decode to. Add ``--batch-size 512`` for the
paper's generation micro-batch (CoBit-M: 64).
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
        eval=EvalConfig(num=1024, seeds="42,43,44,45,46,47,48,49,50,51", reference="test",
                        test_source="hf:openwebtext:train[-100000:]",
                        sweep="name=ddim grid=entropic nfe=256 gamma=0,0.13,0.175,0.18"),
    )
