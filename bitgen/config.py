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

from bitgen import families
from bitgen.config_sections import (
    DataConfig,
    DiffusionConfig,
    EntropyScheduleConfig,
    EvalConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SamplerConfig,
    TrainConfig,
)
from bitgen.diffusion.bit_constants import DATA_CENTER, SIGMA_DATA
from bitgen.errors import ConfigError

__all__ = [
    "ConfigError", "DataConfig", "DiffusionConfig", "EntropyScheduleConfig", "EvalConfig",
    "ExperimentConfig", "MeshConfig", "ModelConfig", "OptimConfig", "SamplerConfig", "TrainConfig",
    "apply_overrides", "config_diff", "from_dict", "load_config", "to_dict", "validate",
]


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    task: str = "cobit"  # the model family (bitgen.families): cobit | ar
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    entropy: EntropyScheduleConfig = field(default_factory=EntropyScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The family's own section: an instance of its ``options`` dataclass (None when it has none;
    # ``validate`` fills in the defaults).
    family: Any = None


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
    **{f"diffusion.{k}": _FRACTION for k in ("self_condition_prob", "cond_dropout")},
    **{f"entropy.{k}": _POSITIVE for k in ("buffer_size", "num_bins", "update_every")},
    **{f"entropy.{k}": _NON_NEGATIVE for k in ("min_per_bin", "warmup_steps", "transition_steps",
                                              "regularizer_c", "regularizer_n")},
    "entropy.gamma_max": _FRACTION,
    **{f"sampler.{k}": _POSITIVE for k in ("terminal_sigma", "s_noise", "batch_size")},
    "sampler.ati_eta": _NON_NEGATIVE,
    "sampler.guidance": _NON_NEGATIVE,
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


def check_bit_constants(diffusion_cfg: DiffusionConfig) -> None:
    """Refuse a DiffusionConfig whose data_center / sigma_data differ from the bit constants.

    Both are fixed by the bit representation (``bitgen.diffusion.bit_constants``); the fields stay
    in the config so existing config.json files load.
    """
    for name, fixed in (("data_center", DATA_CENTER), ("sigma_data", SIGMA_DATA)):
        value = getattr(diffusion_cfg, name)
        if value != fixed:
            raise ConfigError(f"diffusion.{name}={value} is not supported: the matched filter, the "
                              f"SDT's input scaling and the sampler prior are derived for bits in "
                              f"{{0,1}} ({name}={fixed}); set {fixed} or remove the key")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every value and cross-field invariant once; raise ConfigError naming the key and the fix."""
    options = _family_options(cfg.task)
    if options is None and cfg.family is not None:
        raise ConfigError(f"task={cfg.task!r} has no family section; remove family={cfg.family!r}")
    if options is not None:
        if cfg.family is None:
            cfg = dataclasses.replace(cfg, family=options())
        elif not isinstance(cfg.family, options):
            raise ConfigError(f"family={cfg.family!r} is not a {options.__name__} (the section of "
                              f"task={cfg.task!r})")
    flat = to_dict(cfg)
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
    check_bit_constants(d)
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


def _family_options(task: str) -> type | None:
    """The dataclass of ``task``'s own config section (None when the family has none)."""
    if task not in families.names():
        raise ConfigError(f"task={task!r} is not one of the model families {families.names()}")
    return families.get(task).options


def from_dict(data: dict[str, Any], cls: type = ExperimentConfig) -> Any:
    """Build a config from a nested dict, rejecting unknown keys by name."""
    types_ = _field_types(cls)
    if cls is ExperimentConfig:  # the family section's type depends on the task
        options = _family_options(str(data.get("task", ExperimentConfig.task)))
        section = data.get("family")
        if options is None and section:
            raise ConfigError(f"task={data.get('task')!r} has no family section, got family={section!r}")
        types_["family"] = options if section is not None else None
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(unknown)} in {cls.__name__}; valid: {sorted(types_)}"
        )
    kwargs = {}
    for name, typ in types_.items():
        if name not in data or typ is None:
            continue
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(data[name], typ)
        else:
            kwargs[name] = _coerce(data[name], typ, f"{cls.__name__}.{name}")
    return cls(**kwargs)


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``section.field=value`` strings (e.g. ``model.embed_dim=64``).

    ``task=NAME`` is applied first and gives the family section the new family's defaults, so
    ``family.*`` keys given with it refine those; a config saved without a family section (older
    runs) gets its family's defaults too.
    """
    data = to_dict(cfg)
    pairs: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in pairs:
            raise ConfigError(f"override {key!r} is given twice")
        pairs[key] = value
    if pairs.get("task", data["task"]) != data["task"]:
        data["task"], data["family"] = pairs["task"], None
    if data.get("family") is None:
        options = _family_options(str(data["task"]))
        data["family"] = None if options is None else to_dict(options())
    for key, value in pairs.items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config section {part!r} in override {key}={value!r}")
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
