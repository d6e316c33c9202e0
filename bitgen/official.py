"""Official CoBit (PyTorch) parameter names and layouts <-> bitgen SDT parameters.

An official key ``blocks.0.adaln1.mlp.1.weight`` [out, in] is bitgen's
``blocks_0/adaln1/mlp_1/kernel`` [in, out]: list indices join their parent with ``_`` and Linear
weights are transposed. The persistent buffer ``time_fn._freq`` is a constant: it is checked
against the value bitgen computes and then dropped; non-persistent buffers are never saved.
The sizes of a model can be read off its weights (``infer_model_config``) or its official config
(``model_config_from_official``). Reading files is ``bitgen.convert``'s job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from bitgen.config import ConfigError, ModelConfig
from bitgen.modelio import ConversionError, flatten_tree, unflatten_tree
from bitgen.nn.sdt import sigma_frequencies

FREQ_KEY = "time_fn._freq"
# RoPE's inverse frequencies are a non-persistent buffer (never in a state_dict); accepted and
# checked when an export includes them anyway.
ROPE_BUFFER = re.compile(r"blocks\.\d+\.attn\.rope\.inv_freq")


def official_to_bitgen_name(key: str) -> tuple[str, ...]:
    """``blocks.0.attn.qkv_proj.weight`` -> ``("blocks_0", "attn", "qkv_proj", "kernel")``."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    leaf = {"weight": "kernel", "bias": "bias"}.get(parts[-1])
    if leaf is None:
        raise ConversionError(f"key {key!r} is neither a Linear weight nor a bias")
    return (*parts[:-1], leaf)


def bitgen_to_official_name(path: tuple[str, ...]) -> str:
    """Inverse of ``official_to_bitgen_name``."""
    modules = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    leaf = {"kernel": "weight", "bias": "bias"}[path[-1]]
    return ".".join([*modules, leaf])


def _official_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """bitgen leaf -> PyTorch layout (kernel [in, out] -> weight [out, in]); also the inverse."""
    return value.T if path[-1] == "kernel" else value


def expected_official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> PyTorch shape for every parameter of the model described by ``cfg``."""
    from bitgen.diffusion.denoiser import param_shapes

    return {bitgen_to_official_name(path): tuple(reversed(leaf.shape)) if path[-1] == "kernel"
            else tuple(leaf.shape)
            for path, leaf in flatten_tree(param_shapes(cfg)).items()}


def _check_freq(value: np.ndarray, embed_dim: int) -> None:
    want = sigma_frequencies(embed_dim)
    got = np.asarray(value, np.float32).reshape(-1)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=0.0):
        raise ConversionError(
            f"{FREQ_KEY} {np.shape(value)} does not match the sigma-embedding constant for "
            f"embed_dim={embed_dim} (expected shape (1, {embed_dim}) with 10000^(-2k/E) pairs)")


def _check_buffers(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> None:
    if FREQ_KEY in state_dict:
        _check_freq(state_dict[FREQ_KEY], cfg.embed_dim)
    head_dim = cfg.embed_dim // cfg.n_heads
    inv_freq = 1.0 / cfg.rope_base ** (np.arange(0, head_dim, 2) / head_dim)
    for key, value in state_dict.items():
        if ROPE_BUFFER.fullmatch(key) and (np.shape(value) != inv_freq.shape or not np.allclose(
                value, inv_freq, rtol=1e-5)):
            raise ConversionError(f"{key} {np.shape(value)} does not match RoPE with head_dim="
                                  f"{head_dim}, base={cfg.rope_base}; check n_heads / rope_base")


def from_official(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Official state dict (numpy arrays, PyTorch layout) -> bitgen params (float32).

    Raises ConversionError listing every missing key (with its expected shape), every unexpected
    key and every shape mismatch.
    """
    expected = expected_official_shapes(cfg)
    provided = {k: np.asarray(v) for k, v in state_dict.items()
                if k != FREQ_KEY and not ROPE_BUFFER.fullmatch(k)}
    missing = [f"{k} {expected[k]}" for k in expected if k not in provided]
    unexpected = [k for k in provided if k not in expected]
    mismatched = [f"{k}: got {provided[k].shape}, expected {expected[k]}"
                  for k in expected if k in provided and provided[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ConversionError(
            "checkpoint does not match the model config (patch_size, embed_dim, n_blocks, dim_ff, "
            "content_dim, head_hidden; try infer_model_config): " + " | ".join(problems))
    _check_buffers(state_dict, cfg)
    flat = {}
    for key, value in provided.items():
        path = official_to_bitgen_name(key)
        flat[path] = np.ascontiguousarray(_official_layout(value, path), dtype=np.float32)
    return unflatten_tree(flat)


def to_official(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """bitgen params -> official state dict (numpy float32, PyTorch layout, incl. ``time_fn._freq``)."""
    out = {FREQ_KEY: sigma_frequencies(cfg.embed_dim)[None, :]}
    for path, value in flatten_tree(params).items():
        out[bitgen_to_official_name(path)] = np.ascontiguousarray(
            _official_layout(np.asarray(value, np.float32), path))
    expected = expected_official_shapes(cfg)
    bad = sorted(set(expected) ^ (set(out) - {FREQ_KEY}))
    if bad:
        raise ConversionError(f"params do not match the model config; differing keys: {bad}")
    return out


def infer_model_config(state_dict: Mapping[str, np.ndarray], base: ModelConfig | None = None) -> ModelConfig:
    """Read the architecture sizes off an official state dict; other fields come from ``base``.

    Inferred: embed_dim, n_blocks, content_dim, patch_size, head_hidden, dim_ff (kept from
    ``base`` when consistent with the SwiGLU width, else the smallest consistent value) and the
    number of global Fourier features. Not inferable from shapes (taken from ``base``):
    n_heads, seq_tokens, n_fourier_local, dropout, rope_base.
    """
    base = base or ModelConfig()

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConversionError(f"cannot infer the model config: key {key!r} is missing")
        return tuple(np.shape(state_dict[key]))

    embed_dim = shape("time_proj.weight")[0]
    content_dim = shape("cont_input_proj.weight")[0]
    patch_size = shape("unpatch_proj_content.weight")[0] // content_dim
    head_hidden = shape("head.mixer.0.weight")[0]
    hidden = shape("blocks.0.ff.Wa.weight")[0]
    n_blocks = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    dim_ff = base.dim_ff if int(2 * base.dim_ff / 3) == hidden else -(-3 * hidden // 2)
    pos = shape("patch_proj.weight")[1] // patch_size - 2 * content_dim
    n_global = (pos - 1 - 2 * base.n_fourier_local) // 2
    n_heads = base.n_heads if embed_dim % base.n_heads == 0 else max(embed_dim // 64, 1)
    if n_global < 0:
        raise ConversionError(
            f"patch_proj.weight {shape('patch_proj.weight')} leaves {pos} positional features per "
            f"bit, fewer than the {2 * base.n_fourier_local + 1} local ones; check n_fourier_local")
    return replace(base, embed_dim=embed_dim, n_blocks=n_blocks, content_dim=content_dim,
                   patch_size=patch_size, head_hidden=head_hidden, dim_ff=dim_ff,
                   n_fourier_global=n_global, n_heads=n_heads)


# Official model settings bitgen's SDT implements; anything else is refused by name.
_REQUIRED_OFFICIAL = {
    "framework": "continuous_score",
    "data.representation": "binary",
    "model.head_type": "optimal_skip_mlp",
    "model.abs_pos_mode": "local_only",
    "model.use_adaln": True,
    "model.use_swiglu": True,
    "model.use_rope_trunk": True,
    "model.self_condition": True,
    "model.center_inputs": True,
    "model.matched_filter_center": 0.5,
    "model.matched_filter_scale": 1.0,
    "model.out_dim": 1,
    "diffusion.continuous.sigma_data": 0.5,
    "diffusion.continuous.data_center": 0.5,
}


def model_config_from_official(config: Mapping, base: ModelConfig | None = None) -> ModelConfig:
    """bitgen ModelConfig from an official config dict (the layout of ``sdt_config.json``)."""
    def get(dotted: str):
        node = config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    for key, want in _REQUIRED_OFFICIAL.items():
        got = get(key)
        if got is not None and got != want:
            raise ConfigError(f"official config {key}={got!r} is not supported (bitgen's SDT "
                              f"implements {key}={want!r})")
    if (get("model.rpb_max_distance") or 1) > 1:
        raise ConfigError("official config model.rpb_max_distance > 1 (relative position bias) is "
                          "not supported; CoBit uses 1 (off)")
    model = config["model"]
    patch = int(model["patch_size"])
    tokens = get("data.sequence_len_tokens") or int(config["data"]["sequence_len"]) // patch
    return replace(
        base or ModelConfig(),
        patch_size=patch, seq_tokens=int(tokens), embed_dim=int(model["embed_dim"]),
        n_heads=int(model["n_heads"]), n_blocks=int(model["n_blocks"]),
        dim_ff=int(model["dim_ff"]), content_dim=int(model["content_dim_continuous"]),
        head_hidden=int(model["head_hidden"]), dropout=float(model.get("dropout", 0.0)),
        n_fourier_global=int(model["n_fourier_global"]),
        n_fourier_local=int(model["n_fourier_local"]),
        rope_base=float(model.get("rope_base", 10000.0)),
        logit_scaling=str(model.get("continuous_logit_scaling", "matched_filter_residual")),
        mf_clip=float(model.get("matched_filter_clip") or 30.0),
    )

