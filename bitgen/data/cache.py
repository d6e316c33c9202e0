"""On-disk cache of packed token rows: a raw ``[N, T]`` memmap plus a JSON sidecar.

Layout: ``<cache_dir>/rows/<name>-<key>/{rows.bin, meta.json}`` where ``key`` hashes the
fingerprint (every setting that affects the rows). The sidecar stores the full fingerprint and
is checked on every load, so a cache built with other settings is rebuilt, never reused.
Writes are atomic: rows and sidecar go to temporary files that are renamed into place, sidecar
last, so an interrupted build leaves no cache that looks complete. Temporary files carry the
builder's host and PID; the next build removes those whose builder is no longer running.

Format 2 (this one) keys sources by content hash and records how many source records were read;
caches of earlier formats live under other keys and are never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitgen.files import atomic_output, write_atomic

CACHE_FORMAT_VERSION = 2
ROWS_FILE = "rows.bin"
META_FILE = "meta.json"


@dataclass(frozen=True)
class CachedRows:
    rows: np.memmap  # [N, T], read-only
    meta: dict  # the sidecar: fingerprint, shape, dtype, stats
    path: Path  # the cache directory


def cache_dir_for(cache_root: str | Path, name: str, fingerprint: dict) -> Path:
    """Directory of the cache entry for ``fingerprint`` (``name`` keeps it readable)."""
    blob = json.dumps({"format": CACHE_FORMAT_VERSION, **fingerprint}, sort_keys=True).encode()
    key = hashlib.sha256(blob).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48]
    return Path(cache_root).expanduser() / "rows" / f"{slug}-{key}"


def _normalised(fingerprint: dict) -> dict:
    return json.loads(json.dumps({"format": CACHE_FORMAT_VERSION, **fingerprint}, sort_keys=True))


def load_cached_rows(path: Path, fingerprint: dict) -> tuple[CachedRows | None, str]:
    """Open a cache entry if it is complete and was built with ``fingerprint``.

    Returns ``(rows or None, reason)``; ``reason`` says why a rebuild is needed.
    """
    meta_path, rows_path = path / META_FILE, path / ROWS_FILE
    if not meta_path.exists():
        return None, "no cache yet"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None, "unreadable sidecar"
    stored = meta.get("fingerprint", {})
    wanted = _normalised(fingerprint)
    if stored != wanted:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        return None, f"built with other settings ({', '.join(changed)})"
    shape, dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])
    expected_bytes = int(np.prod(shape)) * dtype.itemsize
    if not rows_path.exists() or rows_path.stat().st_size != expected_bytes:
        return None, "rows file missing or truncated"
    rows = np.memmap(rows_path, dtype=dtype, mode="r", shape=shape) if expected_bytes else np.zeros(shape, dtype)
    return CachedRows(rows, meta, path), "reused"


def _tmp_prefix() -> str:
    return f".{ROWS_FILE}.{socket.gethostname()}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_orphaned_tmp_files(rows_root: Path) -> list[Path]:
    """Delete temporary rows files under ``rows_root`` (every cache entry) left by dead builders.

    Only files of this host whose builder PID is gone are removed; files of live builders, of
    other hosts, or in an unknown naming scheme are kept.
    """
    host, removed = socket.gethostname(), []
    for tmp in rows_root.glob(f"*/.{ROWS_FILE}.*.tmp"):
        parts = tmp.name[len(f".{ROWS_FILE}."):].split(".")
        if len(parts) < 3 or not parts[-3].isdigit() or ".".join(parts[:-3]) != host:
            continue
        if not _pid_alive(int(parts[-3])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_cached_rows(path: Path, fingerprint: dict, row_batches: Iterable[np.ndarray], *,
                      seq_tokens: int, dtype: np.dtype, stats_fn) -> CachedRows:
    """Stream ``row_batches`` (each ``[k, T]``) to disk, then commit the sidecar.

    ``stats_fn()`` is called after the batches are exhausted and returns the JSON-able statistics
    stored in the sidecar (so a reused cache reports the numbers of the build).
    """
    path.mkdir(parents=True, exist_ok=True)
    remove_orphaned_tmp_files(path.parent)  # also entries built with settings no longer in use
    n_rows = 0
    with atomic_output(path / ROWS_FILE, tmp_prefix=_tmp_prefix()) as f:
        for batch in row_batches:
            batch = np.asarray(batch)
            if batch.size and (batch.min() < 0 or batch.max() > np.iinfo(dtype).max):
                raise ValueError(f"token ids do not fit the cache dtype {np.dtype(dtype).name}")
            f.write(np.ascontiguousarray(batch, dtype=dtype).tobytes())
            n_rows += batch.shape[0]
        # Drop the old sidecar before the new rows replace the old ones: old sidecar + new rows
        # must never look like a valid cache.
        (path / META_FILE).unlink(missing_ok=True)
    meta = {
        "fingerprint": _normalised(fingerprint),
        "shape": [n_rows, seq_tokens],
        "dtype": np.dtype(dtype).name,
        "stats": stats_fn(),
    }
    write_atomic(path / META_FILE, json.dumps(meta, indent=2))
    cached, reason = load_cached_rows(path, fingerprint)
    assert cached is not None, reason
    return cached
