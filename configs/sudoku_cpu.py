"""CoBit on the generated Sudoku set, sized to learn visibly in about 12-15 minutes on 2 idle CPU
cores (issue 12). ``bitgen train --config sudoku_cpu`` then ``bitgen eval --run-dir runs/sudoku_cpu
--task sudoku``.

Rows are ``[BOS] puzzle [BOS] solution``: 180 tokens of 4 bits (720 bits); the 364 prompt bits
are clamped clean and excluded from the loss (each batch's ``cond_mask``), and 10% of rows drop
their condition (``diffusion.cond_dropout``) so evaluation can use classifier-free guidance.

Sizes: a 4-block width-128 SDT (the trunk sees 180 tokens, the per-bit head 720 bits), batch 32,
800 steps, a short warm-up and a high peak lr as in ``demo_cpu``. Measured on a shared 2-core box
(load average 6.5-7, this process getting ~0.7 of a core): 2.0-2.5 s a step, i.e. ~1.7 CPU-seconds
a step; on an idle 2-core box that is ~0.9-1.0 s a step, so 800 steps take ~13 minutes plus
about half a minute of start-up (rows, compilation). The first run also generates the 50k
puzzles (~2 minutes, cached after).
The entropy schedule is scaled to the run: a 4096-row buffer (128 steps), rebuilt every 50 steps,
entropic σ draws from step 200 (fully from 300). EMA decay 0.99: a time constant of 100 steps
(1/8 of the run); the default 0.9999 would leave the sampled weights near their init.
The sampler runs 180 NFE (the issue's protocol) on the learned entropic grid.
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
        name="sudoku_cpu",
        model=ModelConfig(patch_size=4, seq_tokens=180, embed_dim=128, n_heads=4, n_blocks=4,
                          dim_ff=384, content_dim=32, head_hidden=64, dropout=0.0),
        diffusion=DiffusionConfig(cond_dropout=0.1),
        data=DataConfig(source="sudoku", batch_size=32),
        entropy=EntropyScheduleConfig(buffer_size=4096, num_bins=64, min_per_bin=16,
                                      update_every=50, warmup_steps=200, transition_steps=100),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, min_lr=1e-4, ema_decay=0.99),
        sampler=SamplerConfig(nfe=180, gamma=0.2, batch_size=64),
        train=TrainConfig(steps=800, log_every=25, ckpt_every=200, keep_checkpoints=2,
                          run_dir="runs/sudoku_cpu"),
    )
