"""Parameter files and exported model folders.

Two parameter-file formats hold a flat mapping ``"a/b/kernel" -> float32 array`` (the pytree path
joined with ``/``):

* ``.npz`` — what ``bitgen convert`` writes; it also carries the ModelConfig as JSON under
  ``__model_config__``.
* ``.safetensors`` — what ``bitgen export`` writes inside a model folder; its string metadata
  holds the bitgen version, step, task and vocab_size.

A **model folder** (``bitgen export RUN OUT``) is::

    OUT/config.json         the run's ExperimentConfig as JSON
    OUT/tokenizer/          a copy of <run>/tokenizer/ (the run's text pipeline)
    OUT/model.safetensors   the weights (EMA by default)
    OUT/entropy_table.npz   the run's entropy table at that step (CoBit runs that have one)
    OUT/README.md           a short model card

``read_params_file`` checks names, shapes and dtypes against the abstract parameter tree of the
config before anything is used, so a checkpoint for another config stops with one line.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitgen.errors import BitgenError, one_line

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CARD_FILE = "README.md"
TABLE_FILE = "entropy_table.npz"
_CONFIG_ENTRY = "__model_config__"

# A block parameter that is missing or extra means another number of blocks.
_BLOCK = re.compile(r"^blocks?_\d+/")
# Which config field most likely disagrees with a file when a parameter's shape does not match,
# first matching pattern wins (patterns are searched in the "/"-joined parameter path).
_FIELD_HINTS = (
    (r"(^|/)(embed|lm_head)/", "data.vocab_size (the tokenizer's vocabulary)"),
    (r"(^|/)(patch_proj|unpatch_proj_content|patch_adapter)/", "model.patch_size"),
    (r"(^|/)cont_input_proj/", "model.content_dim"),
    (r"(^|/)(ff|mlp)/W", "model.dim_ff"),
    (r"^head/", "model.head_hidden"),
)


class ConversionError(BitgenError, ValueError):
    """A weights file cannot be read or written, or does not match the model; the message names
    the key or the fix."""


# --------------------------------------------------------------------------------------------------
# Flat <-> nested


def flatten_tree(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dicts -> ``{path tuple: leaf}``."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, (*prefix, name)))
        else:
            out[(*prefix, name)] = value
    return out


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """Inverse of ``flatten_tree``."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _flat_arrays(params: Mapping) -> dict[str, np.ndarray]:
    """``{"a/b/kernel": float32 array}`` on the host."""
    return {"/".join(path): np.ascontiguousarray(np.asarray(value, np.float32))
            for path, value in flatten_tree(params).items()}


# --------------------------------------------------------------------------------------------------
# .npz


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (CRC-checked by zipfile); ConversionError when it cannot be read."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # numpy/zipfile raise many types for damaged files
        raise ConversionError(f"cannot read {path} as .npz ({one_line(err)}); the file is damaged "
                              "or not an .npz written by numpy") from err


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` with a one-line error for an unwritable destination."""
    try:
        np.savez(path, **arrays)
    except OSError as err:
        raise ConversionError(f"cannot write {path} ({one_line(err)}); check that its directory "
                              "exists and is writable") from err


def save_params(path: str | Path, params: Mapping, cfg) -> None:
    """bitgen params -> ``.npz`` keyed by ``/``-joined paths, with the ModelConfig as JSON inside."""
    from bitgen.config import to_dict

    flat: dict[str, np.ndarray] = dict(_flat_arrays(params))
    flat[_CONFIG_ENTRY] = np.asarray(json.dumps(to_dict(cfg)))
    save_npz(Path(path), flat)


def stored_model_config(path: str | Path) -> Any:
    """The ModelConfig a ``.npz`` of ``bitgen convert`` stores, or None (other files hold none)."""
    from bitgen.config import ModelConfig, from_dict

    path = Path(path)
    if path.suffix != ".npz":
        return None
    entry = read_npz(path).get(_CONFIG_ENTRY)
    return None if entry is None else from_dict(json.loads(str(entry)), ModelConfig)


def load_params(path: str | Path) -> tuple[dict, Any]:
    """Inverse of ``save_params``: (params, ModelConfig)."""
    from bitgen.config import ModelConfig, from_dict

    data = read_npz(Path(path))
    if _CONFIG_ENTRY not in data:
        raise ConversionError(f"{path} is not a bitgen params file (no {_CONFIG_ENTRY} entry); "
                              "convert official weights without --to official")
    try:
        cfg = from_dict(json.loads(str(data.pop(_CONFIG_ENTRY))), ModelConfig)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{path}: its {_CONFIG_ENTRY} entry cannot be read ({one_line(err)}); "
                              "the file is damaged") from err
    return unflatten_tree({tuple(k.split("/")): v for k, v in data.items()}), cfg


# --------------------------------------------------------------------------------------------------
# .safetensors


def write_safetensors(path: Path, params: Mapping, meta: Mapping[str, object]) -> None:
    """Params as float32 tensors keyed by ``/``-joined paths; ``meta`` values are stored as strings."""
    from safetensors.numpy import save_file

    try:
        save_file(_flat_arrays(params), str(path), metadata={k: str(v) for k, v in meta.items()})
    except OSError as err:
        raise ConversionError(f"cannot write {path} ({one_line(err)}); check that its directory "
                              "exists and is writable") from err


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own and OS errors for damaged files
        raise ConversionError(f"cannot read {path} as .safetensors ({one_line(err)}); the file is "
                              "damaged or not a safetensors file") from err


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (``bitgen export`` stores version, step,
    task and vocab_size there)."""
    return _read_safetensors(Path(path))[1]


# --------------------------------------------------------------------------------------------------
# Reading against a config


def _field_hint(name: str, present_in_both: bool) -> str:
    if not present_in_both and _BLOCK.search(name):
        return "model.n_blocks"
    for pattern, field in _FIELD_HINTS:
        if re.search(pattern, name):
            return field
    return "model.embed_dim"


def _mismatch(path: Path, name: str, problem: str, present_in_both: bool) -> ConversionError:
    return ConversionError(f"{path} does not match the config: parameter {name} {problem}; check "
                           f"{_field_hint(name, present_in_both)} (the config must describe the "
                           "model that wrote the file)")


def _flat_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConversionError(f"params file {path} does not exist; check the path")
    if path.suffix == ".npz":
        data = read_npz(path)
        data.pop(_CONFIG_ENTRY, None)
        return data
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    raise ConversionError(f"{path} is neither .npz (bitgen convert) nor .safetensors (bitgen "
                          "export); convert official .pt weights first with `bitgen convert`")


def read_params_file(path: str | Path, abstract_params: Any) -> Any:
    """Parameters from a ``.npz`` or ``.safetensors`` file, shaped like ``abstract_params``.

    ``abstract_params``: the pytree of ``jax.ShapeDtypeStruct`` of the config's model
    (``bitgen.train.task.abstract_params``); leaves carrying a ``sharding`` are placed with it.
    Every name, shape and dtype is checked first: the first mismatch raises ConversionError
    naming the parameter, both shapes and the config field most likely wrong.
    """
    import jax

    path = Path(path)
    arrays = _flat_file(path)
    expected = {"/".join(p): leaf for p, leaf in flatten_tree(abstract_params).items()}
    for name, leaf in expected.items():
        if name not in arrays:
            raise _mismatch(path, name, f"{tuple(leaf.shape)} is missing", False)
        value = arrays[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise _mismatch(path, name, f"has shape {tuple(value.shape)}, expected "
                                        f"{tuple(leaf.shape)}", True)
        if np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise ConversionError(f"{path}: parameter {name} is {value.dtype}, expected {leaf.dtype};"
                                  " write the file with bitgen convert/export (float32)")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise _mismatch(path, extra[0], f"{tuple(arrays[extra[0]].shape)} is not in the config's "
                                        f"model ({len(extra)} extra)", False)

    def place(name: str, leaf):
        sharding = getattr(leaf, "sharding", None)
        return arrays[name] if sharding is None else jax.device_put(arrays[name], sharding)

    return unflatten_tree({tuple(n.split("/")): place(n, leaf) for n, leaf in expected.items()})


# --------------------------------------------------------------------------------------------------
# Model folders


@dataclass(frozen=True)
class ModelFolder:
    """The parts of an exported model folder. config: the ExperimentConfig dict; meta: the
    weights' metadata (strings: bitgen_version, step, task, vocab_size, weights)."""

    root: Path
    config: dict
    weights: Path
    tokenizer: Path
    meta: dict[str, str]


def is_model_folder(path: str | Path) -> bool:
    """True for a directory holding config.json, model.safetensors and tokenizer/."""
    path = Path(path)
    return ((path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()
            and (path / TOKENIZER_DIR).is_dir())


def open_model_folder(path: str | Path) -> ModelFolder:
    """The parts of a model folder; ConversionError naming what is missing otherwise."""
    path = Path(path).expanduser()
    if not is_model_folder(path):
        missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR) if not (path / n).exists()]
        raise ConversionError(f"{path} is not a bitgen model folder (missing {', '.join(missing)}); "
                              "write one with `bitgen export RUN OUT`")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path / CONFIG_FILE} ({one_line(err)}); export the "
                              "model again") from err
    return ModelFolder(path, config, path / WEIGHTS_FILE, path / TOKENIZER_DIR,
                       read_safetensors_metadata(path / WEIGHTS_FILE))


def _model_card(cfg_dict: Mapping, meta: Mapping[str, object]) -> str:
    model = cfg_dict.get("model", {})
    sizes = ", ".join(f"{k}={model[k]}" for k in ("patch_size", "seq_tokens", "embed_dim",
                                                    "n_blocks", "n_heads") if k in model)
    return (f"# {cfg_dict.get('name', 'bitgen model')}\n\n"
            f"A bitgen {meta.get('task', '')} model ({sizes}), exported from step "
            f"{meta.get('step', '?')} ({meta.get('weights', 'ema')} weights) with bitgen "
            f"{meta.get('bitgen_version', '?')}.\n\n"
            "Files: `config.json` (the training config), `model.safetensors` (float32 weights "
            "keyed by parameter path), `tokenizer/` (the text pipeline).\n\n"
            "Sample from it:\n\n"
            "```\nbitgen sample --model-dir THIS_FOLDER --num 16 --out samples.txt\n```\n")


def write_model_folder(out: str | Path, cfg_dict: Mapping, params: Mapping, tokenizer_dir: str | Path,
                       meta: Mapping[str, object]) -> Path:
    """Write a model folder (see the module docstring) and return its path.

    ``out`` must not exist or be an empty directory; ``tokenizer_dir`` is copied as ``tokenizer/``.
    """
    out, tokenizer_dir = Path(out).expanduser(), Path(tokenizer_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty directory; choose a new output "
                              "folder or remove it")
    if not tokenizer_dir.is_dir():
        raise ConversionError(f"tokenizer directory {tokenizer_dir} does not exist; the run must "
                              "have saved its text pipeline")
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tokenizer_dir, out / TOKENIZER_DIR)
        (out / CONFIG_FILE).write_text(json.dumps(cfg_dict, indent=2) + "\n")
        (out / CARD_FILE).write_text(_model_card(cfg_dict, meta))
    except OSError as err:
        raise ConversionError(f"cannot write the model folder {out} ({one_line(err)}); check that "
                              "it is writable") from err
    write_safetensors(out / WEIGHTS_FILE, params, meta)
    return out
