"""Model families, looked up by name: ``ExperimentConfig.task`` is read here and nowhere else.

Each family is one module defining ``FAMILY`` (the ``bitgen.families.base.Family`` protocol);
adding one is that module plus one line in ``_MODULES``. Modules are imported on first use;
reading a config imports them for their section dataclass (``options``), and they load model code
only when a method runs.
"""

from __future__ import annotations

import importlib
from typing import Any

from bitgen.errors import BitgenError

# name -> module defining FAMILY
_MODULES = {
    "cobit": "bitgen.families.cobit",  # CoBit bitstream diffusion over P-bit token codes
    "ar": "bitgen.families.ar",  # autoregressive softmax baseline over token ids
    "bitlm": "bitgen.families.bitlm",  # block-causal backbone + bitwise diffusion head (BitLM)
    "block_cobit": "bitgen.families.block_cobit",  # CoBit's SDT and sampler block by block
}


class UnknownFamilyError(BitgenError, ValueError):
    """A config names a model family that is not registered."""


def names() -> tuple[str, ...]:
    """The registered families' names."""
    return tuple(_MODULES)


def get(name: str) -> Any:
    """The registered family ``name`` (a ``bitgen.families.base.Family``)."""
    if name not in _MODULES:
        raise UnknownFamilyError(f"task={name!r} is not a registered model family; known: {names()}")
    return importlib.import_module(_MODULES[name]).FAMILY


def family_of(cfg: Any) -> Any:
    """The family of an ``ExperimentConfig``."""
    return get(cfg.task)
