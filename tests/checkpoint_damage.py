"""Ways to damage one saved step of an orbax checkpoint (``<run>/checkpoints/<step>``), for the
fault-injection tests. Every entry of ``DAMAGE`` changes what a restore would read; ``flip_byte``
may or may not (a flipped bit can decode to the same values), so it is not one of them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import tensorstore as ts


def state_files(step_dir: Path) -> list[Path]:
    """The array data files of a step, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def flip_byte(step_dir: Path) -> None:
    """Flip one bit in the middle of the largest data file. The files hold zstd streams: the flip
    breaks the stream, decodes to other values or, rarely, to the same ones, depending on the
    bytes there (so on the trained values, so on the CPU)."""
    path = state_files(step_dir)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def rewrite_one_weight(step_dir: Path) -> None:
    """Add 1 to one float32 weight through tensorstore, orbax's storage layer (zarr arrays in an
    OCDBT database): the files stay valid, so only the checksums can tell."""
    state = f"file://{step_dir / 'state'}/"
    keys = ts.KvStore.open({"driver": "ocdbt", "base": state}).result().list().result()
    names = [k.decode().removesuffix("/.zarray") for k in keys
             if k.startswith(b"params.") and k.endswith(b"/.zarray")]
    assert names, f"no zarr (v2) params.* arrays in {state}: the checkpoint layout changed"
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": state, "path": f"{names[0]}/"}}).result()
    first = (0,) * array.rank
    array[first] = array[first].read().result() + 1


DAMAGE = {
    "data file deleted": lambda d: state_files(d)[0].unlink(),
    "data file overwritten": lambda d: state_files(d)[0].write_bytes(
        np.random.default_rng(0).bytes(state_files(d)[0].stat().st_size)),
    "data file truncated": lambda d: os.truncate(state_files(d)[0], state_files(d)[0].stat().st_size // 2),
    "OCDBT manifest emptied": lambda d: [p.write_bytes(b"") for p in (d / "state").rglob("manifest.ocdbt")],
    "meta/metadata garbage": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "state/ removed": lambda d: shutil.rmtree(d / "state"),
    "data-iterator JSON garbage": lambda d: next((d / "data").glob("process_*.json")).write_text("]garbage["),
    "one weight rewritten, files valid": rewrite_one_weight,
}
