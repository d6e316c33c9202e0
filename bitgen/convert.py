"""Read official CoBit checkpoints and convert them: ``bitgen convert``.

Sources: ``.npz`` with official key names (as ``sdt_params.npz``) or a PyTorch ``.pt``/``.pth``
checkpoint (needs ``pip install 'bitgen[torch]'``). ``bitgen convert`` runs both directions:
official -> a bitgen params ``.npz`` (``bitgen.modelio.save_params``; read it back against a
config with ``bitgen.modelio.read_params_file``) and bitgen params -> an official-name ``.npz``.
The name and layout mapping lives in ``bitgen.official``.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from bitgen.config import ModelConfig
from bitgen.errors import BitgenError, one_line
from bitgen.hub import resolve
from bitgen.modelio import ConversionError, flatten_tree, load_params, read_npz, save_npz, save_params
from bitgen.official import (
    from_official,
    infer_model_config,
    model_config_from_official,
    to_official,
)

# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
# Where training checkpoints keep the weights, most preferred first (EMA weights are the release).
# The official trainer saves {"model": state_dict, "ema": ..., "optimizer": ...}; released
# checkpoints have the EMA weights baked into "model".
_NESTED_STATE_KEYS = ("ema", "ema_state_dict", "model_ema", "model", "state_dict", "model_state_dict")


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
        state = read_npz(path)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="official .pt/.pth/.npz, or a bitgen params .npz; a local "
                        "path or a Hub file hf:OWNER/NAME/FILE[@REV]")
    parser.add_argument("--sha256", help="expected SHA-256 of the source file (checked before reading)")
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


def run(args: argparse.Namespace) -> int:
    args.source = resolve(args.source, sha256=args.sha256)
    if args.to == "official":
        params, cfg = load_params(args.source)
        save_npz(args.dest, to_official(params, cfg))
        print(f"wrote official state dict ({sum(np.size(v) for v in flatten_tree(params).values()):,} "
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
    print(f"wrote bitgen params ({sum(v.size for v in flatten_tree(params).values()):,} parameters; "
          f"P={cfg.patch_size} E={cfg.embed_dim} blocks={cfg.n_blocks} heads={cfg.n_heads}) "
          f"to {args.dest}")
    return 0
