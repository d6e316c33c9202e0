"""Typed experiment configuration.

A config is a tree of frozen dataclasses. It is validated once (``validate``) so model,
training and sampling code can read fields directly. Experiment files in ``configs/`` define
``get_config() -> ExperimentConfig``; command lines refine them with ``section.field=value``
overrides (``apply_overrides``). ``to_dict``/``from_dict`` round-trip through JSON for
checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitgen.errors import BitgenError


class ConfigError(BitgenError, ValueError):
    """A configuration value or file is invalid; the message names the key and the fix."""


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


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer, packing and bit encoding (spec §1)."""

    source: str = "fortunes"  # fortunes | path to .txt/.jsonl(.gz)/.parquet | hf:<name>
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


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    task: str = "cobit"  # cobit (bit diffusion) | ar (autoregressive baseline over token ids)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    entropy: EntropyScheduleConfig = field(default_factory=EntropyScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.logit_scaling": ("matched_filter_residual", "none", "matched_filter_only", "inv_sigma2"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "cudnn"),
    "diffusion.loss_type": ("binary_sm", "binary_ce"),
    "diffusion.loss_weighting": ("edm", "unit"),
    "sampler.name": ("ddim", "heun"),
    "sampler.grid": ("entropic", "karras"),
    "sampler.sc_mode": ("carry", "refined"),
    "data.packing": ("sep", "window"),
    "data.code_policy": ("modulo", "stop", "nearest"),
    "eval.reference": ("heldout", "test"),
    "eval.evaluator_dtype": ("auto", "float32", "bfloat16"),
}


# key -> (test, what a working value is): every value that cannot work, refused before a run starts.
_POSITIVE, _NON_NEGATIVE, _UNIT, _FRACTION = ((lambda v: v > 0), "> 0"), ((lambda v: v >= 0), ">= 0"), \
    ((lambda v: 0 <= v < 1), "in [0, 1)"), ((lambda v: 0 <= v <= 1), "in [0, 1]")
_RANGES: dict[str, tuple[Any, str]] = {
    **{f"model.{k}": _POSITIVE for k in ("seq_tokens", "embed_dim", "n_heads", "n_blocks", "dim_ff",
                                         "content_dim", "head_hidden", "rope_base", "mf_clip")},
    **{f"model.{k}": _NON_NEGATIVE for k in ("n_fourier_global", "n_fourier_local")},
    "model.dropout": _UNIT,
    **{f"diffusion.{k}": _POSITIVE for k in ("sigma_data", "p_std", "rho")},
    "diffusion.self_condition_prob": _FRACTION,
    **{f"entropy.{k}": _POSITIVE for k in ("buffer_size", "num_bins", "update_every")},
    **{f"entropy.{k}": _NON_NEGATIVE for k in ("min_per_bin", "warmup_steps", "transition_steps",
                                              "regularizer_c", "regularizer_n")},
    "entropy.gamma_max": _FRACTION,
    **{f"sampler.{k}": _POSITIVE for k in ("terminal_sigma", "s_noise", "batch_size")},
    "sampler.ati_eta": _NON_NEGATIVE,
    "data.batch_size": _POSITIVE,
    "data.max_document_chars": _POSITIVE,
    "data.val_fraction": _UNIT,
    **{f"optim.{k}": _POSITIVE for k in ("lr", "eps", "grad_clip")},
    **{f"optim.{k}": _NON_NEGATIVE for k in ("min_lr", "weight_decay", "warmup_steps")},
    **{f"optim.{k}": _UNIT for k in ("b1", "b2", "ema_decay")},
    **{f"mesh.{k}": ((lambda v: v == -1 or v >= 1), "-1 (fill) or >= 1") for k in ("data", "fsdp", "tensor")},
    **{f"train.{k}": _POSITIVE for k in ("steps", "log_every", "ckpt_every", "keep_checkpoints")},
    **{f"train.{k}": ((lambda v: v >= 0), ">= 0 (0 = off)") for k in ("keep_every", "sample_every")},
}


def _check_ranges(flat: dict[str, Any]) -> None:
    for section, fields in flat.items():
        for name, value in (fields.items() if isinstance(fields, dict) else ()):
            key = f"{section}.{name}"
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{key}={value} is not finite; give a finite number")
            test, allowed = _RANGES.get(key, (None, ""))
            if test is not None and not test(value):
                raise ConfigError(f"{key}={value!r} cannot work: it must be {allowed}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every value and cross-field invariant once; raise ConfigError naming the key and the fix."""
    flat = to_dict(cfg)
    if cfg.task not in ("cobit", "ar"):
        raise ConfigError(f"task={cfg.task!r} is not one of ('cobit', 'ar')")
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    _check_ranges(flat)
    m = cfg.model
    if m.embed_dim % m.n_heads:
        raise ConfigError(
            f"model.embed_dim={m.embed_dim} is not divisible by model.n_heads={m.n_heads}"
        )
    if (m.embed_dim // m.n_heads) % 2:
        raise ConfigError("model head_dim (embed_dim/n_heads) must be even for RoPE")
    if m.embed_dim % 2:
        raise ConfigError("model.embed_dim must be even (interleaved cos/sin sigma embedding)")
    if not 1 <= m.patch_size <= 32:
        raise ConfigError(f"model.patch_size={m.patch_size} must be in [1, 32] bits")
    if m.head_chunk_tokens < 0 or (m.head_chunk_tokens and m.seq_tokens % m.head_chunk_tokens):
        raise ConfigError(
            f"model.head_chunk_tokens={m.head_chunk_tokens} must be 0 (off) or a positive divisor "
            f"of model.seq_tokens={m.seq_tokens}"
        )
    d = cfg.diffusion
    if not 0 < d.sigma_min < d.sigma_max:
        raise ConfigError(f"diffusion.sigma_min={d.sigma_min} and diffusion.sigma_max={d.sigma_max} "
                          "must satisfy 0 < sigma_min < sigma_max")
    s = cfg.sampler
    if s.nfe < 3:
        raise ConfigError(f"sampler.nfe={s.nfe} must be >= 3 (the grid has nfe-1 points)")
    lo, hi = s.window_q
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"sampler.window_q={s.window_q} must satisfy 0 <= lo <= hi <= 1")
    if s.gamma < 0:
        raise ConfigError("sampler.gamma must be >= 0")
    if cfg.data.vocab_size < 2:
        raise ConfigError("data.vocab_size must be >= 2")
    if cfg.optim.grad_accum < 1:
        raise ConfigError("optim.grad_accum must be >= 1")
    if cfg.train.steps <= cfg.optim.warmup_steps:
        raise ConfigError(f"train.steps={cfg.train.steps} must exceed "
                          f"optim.warmup_steps={cfg.optim.warmup_steps}; raise one or lower the other")
    if cfg.data.batch_size % cfg.optim.grad_accum:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by "
            f"optim.grad_accum={cfg.optim.grad_accum}"
        )
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict view (tuples become lists, JSON-ready)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if typ is int:
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if math.isnan(out):
            raise ConfigError(f"{key}: NaN is not a valid value")
        return out
    if typ is str:
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(typ)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, args))
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(data: dict[str, Any], cls: type = ExperimentConfig) -> Any:
    """Build a config from a nested dict, rejecting unknown keys by name."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(unknown)} in {cls.__name__}; valid: {sorted(types_)}"
        )
    kwargs = {}
    for name, typ in types_.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(data[name], typ)
        else:
            kwargs[name] = _coerce(data[name], typ, f"{cls.__name__}.{name}")
    return cls(**kwargs)


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``section.field=value`` strings (e.g. ``model.embed_dim=64``)."""
    data = to_dict(cfg)
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(f"override {key!r} is given twice")
        seen.add(key)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config section {part!r} in override {item!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys here: {sorted(node)}"
            )
        node[parts[-1]] = value
    return validate(from_dict(data))


def config_diff(a: ExperimentConfig, b: ExperimentConfig, sections: tuple[str, ...]) -> list[str]:
    """Dotted keys under ``sections`` whose values differ between two configs."""
    da, db = to_dict(a), to_dict(b)
    return [
        f"{s}.{k}"
        for s in sections
        for k in sorted(set(da[s]) | set(db[s]))
        if da[s].get(k) != db[s].get(k)
    ]


# The shipped experiment configs: bitgen/configs in a regular install or wheel (setup.py maps the
# top-level configs/ there), else configs/ beside the package (a source checkout, editable install).
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else _PACKAGED_CONFIGS.parent.parent / "configs"


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load ``configs/<name>.py`` (or any ``.py``/``.json`` path) and apply overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.py"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"config {name_or_path!r} not found (looked at {path}); known: {known}")
    if path.suffix == ".json":
        cfg = from_dict(json.loads(path.read_text()))
    else:
        spec = importlib.util.spec_from_file_location(f"bitgen_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        if not isinstance(getattr(module, "get_config", None), types.FunctionType):
            raise ConfigError(f"{path} must define get_config() -> ExperimentConfig")
        cfg = module.get_config()
    return apply_overrides(validate(cfg), overrides or [])
