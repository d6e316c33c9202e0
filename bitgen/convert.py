"""Official CoBit (PyTorch) state dicts <-> bitgen SDT parameters.

An official key ``blocks.0.adaln1.mlp.1.weight`` [out, in] is bitgen's
``blocks_0/adaln1/mlp_1/kernel`` [in, out]: list indices join their parent with ``_`` and Linear
weights are transposed. The persistent buffer ``time_fn._freq`` is a constant: it is checked
against the value bitgen computes and then dropped; non-persistent buffers are never saved.

Sources: ``.npz`` with official key names (as ``sdt_params.npz``) or a PyTorch ``.pt``/``.pth``
checkpoint (needs ``pip install 'bitgen[torch]'``). ``bitgen convert`` runs both directions.
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from bitgen.config import ConfigError, ModelConfig, from_dict, to_dict
from bitgen.errors import BitgenError, one_line
from bitgen.nn.sdt import sigma_frequencies

FREQ_KEY = "time_fn._freq"
# RoPE's inverse frequencies are a non-persistent buffer (never in a state_dict); accepted and
# checked when an export includes them anyway.
ROPE_BUFFER = re.compile(r"blocks\.\d+\.attn\.rope\.inv_freq")
# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
# Where training checkpoints keep the weights, most preferred first (EMA weights are the release).
# The official trainer saves {"model": state_dict, "ema": ..., "optimizer": ...}; released
# checkpoints have the EMA weights baked into "model".
_NESTED_STATE_KEYS = ("ema", "ema_state_dict", "model_ema", "model", "state_dict", "model_state_dict")


class ConversionError(BitgenError, ValueError):
    """A file cannot be read or does not match the model; the message names the key or the fix."""


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (CRC-checked by zipfile); ConversionError when it cannot be read."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # numpy/zipfile raise many types for damaged files
        raise ConversionError(f"cannot read {path} as .npz ({one_line(err)}); the file is damaged "
                              "or not an .npz written by numpy") from err


def _check_zip(path: Path) -> None:
    """A zip-format PyTorch file whose member CRCs do not match is damaged: say so before torch
    reports it as something else."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # zipfile raises several types for a damaged archive
        bad = one_line(err)
    if bad is not None:
        raise ConversionError(f"{path} is damaged (zip member {bad} fails its CRC check); "
                              "download or copy it again")


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


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, name)))
        else:
            out[(*prefix, name)] = value
    return out


def _unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _official_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """bitgen leaf -> PyTorch layout (kernel [in, out] -> weight [out, in]); also the inverse."""
    return value.T if path[-1] == "kernel" else value


def expected_official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> PyTorch shape for every parameter of the model described by ``cfg``."""
    from bitgen.diffusion.denoiser import param_shapes

    return {bitgen_to_official_name(path): tuple(reversed(leaf.shape)) if path[-1] == "kernel"
            else tuple(leaf.shape)
            for path, leaf in _flatten(param_shapes(cfg)).items()}


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
    return _unflatten(flat)


def to_official(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """bitgen params -> official state dict (numpy float32, PyTorch layout, incl. ``time_fn._freq``)."""
    out = {FREQ_KEY: sigma_frequencies(cfg.embed_dim)[None, :]}
    for path, value in _flatten(params).items():
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


def _strip_prefixes(state: Mapping[str, object]) -> dict[str, object]:
    out = {}
    for key, value in state.items():
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _looks_like_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(str(k).endswith((".weight", ".bias")) for k in obj)


def _select_state(obj: object, state_key: str | None) -> tuple[Mapping, str]:
    """(state dict, where it was found) inside a loaded checkpoint object."""
    if state_key is not None:
        for part in state_key.split("/"):
            if not isinstance(obj, Mapping) or part not in obj:
                entries = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
                raise ConversionError(f"checkpoint has no entry {state_key!r} (at {part!r}: {entries})")
            obj = obj[part]
        if not _looks_like_state_dict(obj):
            raise ConversionError(f"checkpoint entry {state_key!r} is not a state dict")
        return obj, state_key
    if _looks_like_state_dict(obj):
        return obj, "<top level>"
    if isinstance(obj, Mapping):
        for key in _NESTED_STATE_KEYS:
            for candidate, where in ((obj.get(key), key), (_shadow(obj.get(key)), f"{key}/shadow")):
                if _looks_like_state_dict(candidate):
                    return candidate, where
    entries = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"no state dict found in checkpoint (entries: {entries}); name the entry "
                          "holding the weights with --state-key (e.g. ema/shadow)")


def _shadow(obj: object) -> object:
    """EMA helpers keep their averaged weights under a 'shadow' entry."""
    return obj.get("shadow") if isinstance(obj, Mapping) else None


def load_official_state_dict(path: str | Path, state_key: str | None = None, *,
                              allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Official weights as numpy float32 arrays keyed by official names.

    ``.npz``: keys are the official names. ``.pt``/``.pth``/``.bin``: loaded with torch on CPU;
    the state dict is found at the top level, under ``state_key`` ("a/b" for nested entries) or
    under the usual training-checkpoint entries (EMA first); ``module.``/``_orig_mod.`` prefixes
    are stripped. Full training checkpoints pickle non-tensor objects: reading them needs
    ``allow_pickle=True`` (only for files you trust — unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".npz":
        if state_key is not None:
            raise ConversionError("--state-key applies to PyTorch checkpoints, not .npz")
        state = _read_npz(path)
    else:
        try:
            import torch
        except ImportError:
            raise ConversionError(
                f"reading {path.name} needs PyTorch: pip install 'bitgen[torch]' (torch==2.13.0, CPU "
                "is enough), or export the state dict to .npz with numpy") from None
        _check_zip(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as err:  # torch raises many types for damaged or foreign files
            # torch's weights-only unpickler refuses objects other than tensors with this phrase;
            # anything else means the file is not a readable PyTorch checkpoint.
            if not allow_pickle and "Weights only load failed" in str(err):
                raise ConversionError(
                    f"{path.name} holds more than tensors (optimizer/EMA objects) and torch refused "
                    "to unpickle it safely; if it is a training checkpoint you trust, re-run with "
                    "--allow-pickle") from err
            raise ConversionError(f"cannot read {path} ({one_line(err)}); the file is damaged or "
                                  "not a PyTorch checkpoint") from err
        selected, where = _select_state(obj, state_key)
        print(f"using the weights at {where} of {path.name}")
        state = {k: v.detach().to(torch.float32).numpy() if hasattr(v, "detach") else np.asarray(v)
                 for k, v in selected.items()}
    return {k: np.asarray(v, np.float32) for k, v in _strip_prefixes(state).items()}


def save_params(path: str | Path, params: Mapping, cfg: ModelConfig) -> None:
    """bitgen params -> ``.npz`` keyed by ``/``-joined paths, with the ModelConfig as JSON inside."""
    flat = {"/".join(p): np.asarray(v) for p, v in _flatten(params).items()}
    flat["__model_config__"] = np.asarray(json.dumps(to_dict(cfg)))
    _save_npz(Path(path), flat)


def load_params(path: str | Path) -> tuple[dict, ModelConfig]:
    """Inverse of ``save_params``: (params, ModelConfig)."""
    data = _read_npz(Path(path))
    if "__model_config__" not in data:
        raise ConversionError(f"{path} is not a bitgen params file (no __model_config__ entry); "
                              "convert official weights without --to official")
    try:
        cfg = from_dict(json.loads(str(data.pop("__model_config__"))), ModelConfig)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{path}: its __model_config__ entry cannot be read ({one_line(err)}); "
                              "the file is damaged") from err
    return _unflatten({tuple(k.split("/")): v for k, v in data.items()}), cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="official .pt/.pth/.npz, or a bitgen params .npz")
    parser.add_argument("dest", type=Path, help="output .npz")
    parser.add_argument("--to", choices=("bitgen", "official"), default="bitgen",
                        help="bitgen: official checkpoint -> bitgen params (default); "
                             "official: bitgen params -> official-name .npz")
    parser.add_argument("--official-config", type=Path,
                        help="official config JSON (layout of sdt_config.json); default: infer the "
                             "sizes from the weights")
    parser.add_argument("--n-heads", type=int, help="attention heads (not visible in the weights; "
                        "default embed_dim/64)")
    parser.add_argument("--seq-tokens", type=int, help="tokens per sequence for the saved config")
    parser.add_argument("--state-key", help="entry of a training checkpoint that holds the weights "
                        "(nested entries as a/b); default: EMA weights if present, else 'model'")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read full training checkpoints (unpickles objects: trusted files only)")


def _read_official_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read --official-config {path} ({one_line(err)}); give the "
                              "official sdt_config.json") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConversionError(f"--official-config {path} has no 'model' section; give the official "
                              "sdt_config.json")
    return config


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    try:
        np.savez(path, **arrays)
    except OSError as err:
        raise ConversionError(f"cannot write {path} ({one_line(err)}); check that its directory "
                              "exists and is writable") from err


def run(args: argparse.Namespace) -> int:
    if args.to == "official":
        params, cfg = load_params(args.source)
        _save_npz(args.dest, to_official(params, cfg))
        print(f"wrote official state dict ({sum(np.size(v) for v in _flatten(params).values()):,} "
              f"parameters) to {args.dest}")
        return 0
    state = load_official_state_dict(args.source, args.state_key, allow_pickle=args.allow_pickle)
    if args.official_config is not None:
        try:
            cfg = model_config_from_official(_read_official_config(args.official_config))
        except BitgenError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"--official-config {args.official_config} lacks or garbles a "
                                  f"model field ({one_line(err)}); give the official sdt_config.json"
                                  ) from err
    else:
        embed_dim = np.shape(state.get("time_proj.weight", (0,)))[0]
        cfg = infer_model_config(state, ModelConfig(n_heads=args.n_heads or max(embed_dim // 64, 1)))
    overrides = {k: v for k, v in (("n_heads", args.n_heads), ("seq_tokens", args.seq_tokens)) if v}
    cfg = replace(cfg, **overrides)
    params = from_official(state, cfg)
    save_params(args.dest, params, cfg)
    print(f"wrote bitgen params ({sum(v.size for v in _flatten(params).values()):,} parameters; "
          f"P={cfg.patch_size} E={cfg.embed_dim} blocks={cfg.n_blocks} heads={cfg.n_heads}) "
          f"to {args.dest}")
    return 0
