"""CoBit on Sudoku at the reference size of issue 12 (for an accelerator): 8 blocks x 512 wide,
20k steps at batch 256, 180 NFE, as in the S-FLM protocol the reference numbers come from
(exact match easy/medium/hard: Duo 96.3 / 84.7 / 58.4, FLM 94.2 / 82.7 / 44.5,
AR greedy 14.6 / 5.1 / 1.0).

20k steps x 256 rows is about 107 passes over the 48k training puzzles, so dropout stays at 0.1.
The entropy schedule is scaled to the run: a 131,072-row buffer (512 steps), rebuilt every 500
steps, entropic σ draws from step 4000 (fully from 6000). EMA decay 0.999 (time constant 1000
steps, 5% of the run). 10% condition dropout for classifier-free guidance at evaluation.
"""

from bitgen.config import (
    DataConfig,
    DiffusionConfig,
    EntropyScheduleConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    SamplerConfig,
    TrainConfig,
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="sudoku_ref",
        model=ModelConfig(patch_size=4, seq_tokens=180, embed_dim=512, n_heads=8, n_blocks=8,
                          dim_ff=2048, content_dim=64, head_hidden=128, dropout=0.1,
                          compute_dtype="bfloat16"),
        diffusion=DiffusionConfig(cond_dropout=0.1),
        data=DataConfig(source="sudoku", batch_size=256),
        entropy=EntropyScheduleConfig(buffer_size=131_072, num_bins=128, min_per_bin=100,
                                      update_every=500, warmup_steps=4000, transition_steps=2000),
        optim=OptimConfig(lr=3e-4, warmup_steps=1000, min_lr=1e-6, ema_decay=0.999),
        sampler=SamplerConfig(nfe=180, gamma=0.2, batch_size=256),
        train=TrainConfig(steps=20_000, log_every=100, ckpt_every=2000, keep_checkpoints=2,
                          run_dir="runs/sudoku_ref"),
    )
