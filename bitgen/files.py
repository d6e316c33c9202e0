"""Atomic file writes: a reader sees a file's old content or its complete new content, never a
prefix, even when the writer is killed part-way."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_output(path: str | Path, *, tmp_prefix: str | None = None) -> Iterator[BinaryIO]:
    """A binary file to write the new content of ``path`` into; a clean exit renames it onto
    ``path``, an error or interrupt deletes it.

    The temporary file lies next to ``path`` (same file system, so the rename is atomic) and is
    named ``<tmp_prefix><random>.tmp``; ``tmp_prefix`` defaults to ``.<name>.``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix or f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace the content of ``path`` with ``data`` (``str`` is written as UTF-8) atomically."""
    with atomic_output(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
