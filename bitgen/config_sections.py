"""The sections of an experiment config: one frozen dataclass per concern (spec defaults).

``bitgen.config`` assembles them into ``ExperimentConfig`` and validates them; import them from
there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """SDT denoiser (spec §2). Defaults: CoBit-S on LM1B (P=15, T=128)."""

    patch_size: int = 15  # P: bits per token = bits per transformer patch
    seq_tokens: int = 128  # T: tokens per sequence; the model sees S = T*P bits
    embed_dim: int = 768  # E
    n_heads: int = 12
    n_blocks: int = 12
    dim_ff: int = 3072  # SwiGLU hidden = int(2*dim_ff/3)
    content_dim: int = 64  # C: width of the shared Linear(1->C) per analog bit
    head_hidden: int = 128  # H: optimal_skip_mlp head width
    dropout: float = 0.1
    n_fourier_global: int = 32  # kept for shape compatibility; always zero (local_only)
    n_fourier_local: int = 4
    rope_base: float = 10000.0
    # matched_filter_residual | none | matched_filter_only | inv_sigma2 (spec §3)
    logit_scaling: str = "matched_filter_residual"
    mf_clip: float = 30.0
    compute_dtype: str = "float32"  # float32 | bfloat16 activations; params stay float32
    attention: str = "xla"  # xla | cudnn (jax.nn.dot_product_attention implementation)
    remat: bool = False  # rematerialise each trunk block in the backward pass
    # Per-bit head over chunks of this many tokens, rematerialised (0 = off): the backward pass
    # then holds one chunk's [B, chunk·P, H] activations instead of the whole sequence's.
    head_chunk_tokens: int = 0

    @property
    def seq_bits(self) -> int:
        return self.seq_tokens * self.patch_size


@dataclass(frozen=True)
class DiffusionConfig:
    """VE process, loss and base sigma distribution (spec §4.1-4.4)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    data_center: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    rho: float = 7.0
    loss_type: str = "binary_sm"  # binary_sm | binary_ce
    loss_weighting: str = "edm"  # edm | unit
    self_condition_prob: float = 0.5
    # Conditional training (batches with a "cond_mask"): probability that a row's conditioning is
    # dropped (every bit becomes a target), so one model serves both branches of guidance.
    cond_dropout: float = 0.0


@dataclass(frozen=True)
class EntropyScheduleConfig:
    """Online entropy-rate sigma schedule (spec §4.3)."""

    enabled: bool = True
    buffer_size: int = 800_000
    num_bins: int = 128
    min_per_bin: int = 100
    update_every: int = 2000
    warmup_steps: int = 40_000
    transition_steps: int = 10_000
    gamma_max: float = 1.0
    regularizer_c: float = 0.1
    regularizer_n: float = 3.0
    target_power: float = 0.5  # 0.5 = "sqrt-rate"


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings (spec §5). Defaults: the LM1B headline (256 NFE, gamma 0.2, full band)."""

    name: str = "ddim"  # ddim | heun
    grid: str = "entropic"  # entropic | karras
    nfe: int = 256  # target NFE label; the grid has nfe-1 points (spec §5.5)
    terminal_sigma: float = 0.08
    gamma: float = 0.2  # per-step churn target; 0 = deterministic PF-ODE
    s_noise: float = 1.003
    window_q: tuple[float, float] = (0.0, 1.0)  # churn window as entropy-CDF quantiles
    sc_mode: str = "carry"  # carry | refined
    ati_eta: float = 0.0
    batch_size: int = 64
    # Classifier-free guidance scale w over the clamped (prompt) bits: 1 = the conditional model
    # (one network call per denoise), 0 = the unconditional one, > 1 amplifies the condition. Any
    # w != 1 runs both branches (two calls per denoise, paid out of the same ``nfe`` budget) and
    # needs a prompt; only bit-diffusion families guide.
    guidance: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer, packing and bit encoding (spec §1)."""

    # fortunes | path to .txt/.jsonl(.gz)/.parquet | hf:<name> | sudoku (the generated Sudoku set:
    # 48k train / 2k validation rows of 180 4-bit tokens, seed 12, prompt bits as each batch's
    # cond_mask; needs model.seq_tokens=180, model.patch_size=4; ignores tokenizer, vocab_size,
    # packing, code_policy, val_fraction; see bitgen/data/sudoku_corpus.py)
    source: str = "fortunes"
    text_field: str = "text"
    tokenizer: str = "bpe"  # bpe (trained on the corpus) | path to tokenizer.json / vocab.txt
    vocab_size: int = 8192  # for a trained BPE tokenizer; P = ceil(log2 V)
    packing: str = "sep"  # sep (LM1B rule) | window (OWT rule)
    # packing=window: second-stage code tokenizer (<name>.json + <name>.meta.json); "" = base ids
    code_tokenizer: str = ""
    code_policy: str = "modulo"  # modulo | stop | nearest (codes >= V)
    bit_order: str = "raw"  # raw | gray | frequency (code = frequency rank) | path to an id->code map (.npy)
    val_fraction: float = 0.005
    cache_dir: str = "~/.cache/bitgen"
    skip_bad_utf8: bool = False
    # Longer documents are tokenised in pieces cut at whitespace (bounded memory; counted in
    # `bitgen data`). 1M characters is far above any LM1B sentence or typical OWT page.
    max_document_chars: int = 1_000_000
    batch_size: int = 512  # global batch (sequences)
    seed: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + warm-up/cosine + EMA (spec §4.5)."""

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 2500
    min_lr: float = 1e-6
    ema_decay: float = 0.9999
    grad_accum: int = 1


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 fills the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1_000_000
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_checkpoints: int = 3  # the latest N checkpoints are kept ...
    keep_every: int = 0  # ... and every step that is a multiple of this (0 = none)
    sample_every: int = 0  # 0 = never
    run_dir: str = "runs/default"


@dataclass(frozen=True)
class EvalConfig:
    """Defaults of ``bitgen eval`` (spec §6; flags override them). The defaults are a quick look;
    the paper configs set the paper's protocol (docs/evaluation.md)."""

    num: int = 64  # samples per operating point and seed (paper: 1024)
    seeds: str = "0"  # comma-separated sampling seeds (paper: 42,...,51)
    # Real-data reference rows: heldout (the corpus's held-out tail) | test (eval.test_source)
    reference: str = "heldout"
    test_source: str = ""  # data source of the test split, e.g. hf:lm1b:test ("" = none)
    # gpt2:DIR evaluators: auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16
    evaluator_dtype: str = "auto"
    sweep: str = ""  # operating points in --sweep syntax ("" = the run's sampler settings)
