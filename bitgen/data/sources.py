"""Text sources: the embedded fortunes corpus, local files and Hugging Face datasets.

``open_source(cfg)`` resolves ``DataConfig.source``:
- ``fortunes``: the corpus shipped in ``bitgen/assets`` (14,307 texts, works offline);
- a ``.txt`` file: **one document per line** (empty lines skipped), the layout of the LM1B text
  files of spec §1.1;
- a ``.jsonl`` / ``.jsonl.gz`` file: one JSON object per line, text in ``DataConfig.text_field``;
- a ``.parquet`` file: column ``DataConfig.text_field``;
- ``hf:<name>[:<split>]`` (e.g. ``hf:lm1b``, ``hf:openwebtext:train``): needs ``datasets`` and
  the network (or its local cache).

Every document is normalised the same way (``\\r\\n``/``\\r`` -> ``\\n``, outer whitespace stripped,
spec §1.2) and empty documents are dropped. A source has an ``identity`` (a JSON-able dict, cheap
to compute) that keys on-disk caches.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bitgen.config import DataConfig

NORMALISATION_VERSION = 1  # bump when normalize_document changes: it invalidates caches
HF_PREFIX = "hf:"


class DataError(ValueError):
    """Bad data input or settings; the message names the problem and the fix."""


def normalize_document(text: str) -> str:
    """Unify line endings and strip outer whitespace (spec §1.2 text normalisation)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


@dataclass
class ReadStats:
    """Counters filled while a source is read."""

    documents: int = 0
    skipped_bad_utf8: int = 0


@dataclass(frozen=True)
class TextSource:
    """A named, fingerprinted stream of documents."""

    name: str
    identity: dict
    _read: Callable[[ReadStats], Iterator[str]] = field(repr=False)

    def documents(self, stats: ReadStats | None = None) -> Iterator[str]:
        """Yield normalised, non-empty documents, counting them in ``stats``."""
        stats = ReadStats() if stats is None else stats
        for text in self._read(stats):
            text = normalize_document(text)
            if text:
                stats.documents += 1
                yield text


def fortunes_path() -> Path:
    return Path(str(resources.files("bitgen") / "assets" / "fortunes" / "fortunes.jsonl.gz"))


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _decode_line(raw: bytes, path: Path, offset: int, lineno: int, skip_bad_utf8: bool,
                 stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if skip_bad_utf8:
            stats.skipped_bad_utf8 += 1
            return None
        where = "of the decompressed stream " if path.suffix == ".gz" else ""
        raise DataError(
            f"{path}: invalid UTF-8 at byte offset {offset + err.start} {where}(line {lineno}): "
            f"{err.reason}; fix the file or set data.skip_bad_utf8=true to skip such documents"
        ) from None


def _iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line without newline) for plain or gzip files."""
    opener = gzip.open if path.suffix == ".gz" else open
    offset = 0
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, offset, raw.rstrip(b"\r\n")
            offset += len(raw)


def _read_txt(path: Path, skip_bad_utf8: bool) -> Callable[[ReadStats], Iterator[str]]:
    def read(stats: ReadStats) -> Iterator[str]:
        for lineno, offset, raw in _iter_lines(path):
            text = _decode_line(raw, path, offset, lineno, skip_bad_utf8, stats)
            if text is not None:
                yield text

    return read


def _read_jsonl(path: Path, text_field: str, skip_bad_utf8: bool) -> Callable[[ReadStats], Iterator[str]]:
    def read(stats: ReadStats) -> Iterator[str]:
        for lineno, offset, raw in _iter_lines(path):
            if not raw.strip():
                continue
            line = _decode_line(raw, path, offset, lineno, skip_bad_utf8, stats)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg}); fix or remove it") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}: line {lineno} has no field {text_field!r} (found {keys}); set "
                    "data.text_field to the field holding the text"
                )
            yield str(record[text_field])

    return read


def _read_parquet(path: Path, text_field: str) -> Callable[[ReadStats], Iterator[str]]:
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if text_field not in columns:
        raise DataError(f"{path} has no column {text_field!r} (columns: {columns}); set data.text_field")

    def read(stats: ReadStats) -> Iterator[str]:
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)

    return read


def _open_hf(spec: str, text_field: str) -> TextSource:
    name, _, split = spec[len(HF_PREFIX):].partition(":")
    split = split or "train"
    alternative = (
        "download the corpus elsewhere and point data.source at a local .txt/.jsonl(.gz)/.parquet "
        "file (or use data.source=fortunes, the embedded corpus)"
    )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.source={spec!r} needs the Hugging Face `datasets` package: pip install "
            f"'bitgen[hf]', or {alternative}"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline/hub failures surface as many different error types
        raise DataError(f"could not load dataset {name!r} split {split!r} ({type(err).__name__}: {err}); "
                        f"offline? {alternative}") from err
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r} ({ds.column_names}); set data.text_field")

    def read(stats: ReadStats) -> Iterator[str]:
        for batch in ds.iter(batch_size=1000):
            yield from batch[text_field]

    identity = {"hf": name, "split": split, "fingerprint": getattr(ds, "_fingerprint", None), "rows": len(ds)}
    return TextSource(f"hf-{name}-{split}", identity, read)


def open_source(cfg: DataConfig) -> TextSource:
    """Resolve ``cfg.source`` into a ``TextSource`` (files are checked now, read lazily)."""
    spec = cfg.source
    if spec.startswith(HF_PREFIX):
        return _open_hf(spec, cfg.text_field)
    if spec == "fortunes":
        path = fortunes_path()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return TextSource("fortunes", {"embedded": "fortunes", "sha256": digest},
                          _read_jsonl(path, "text", skip_bad_utf8=False))
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source file {path} does not exist; give an existing .txt/.jsonl(.gz)/.parquet file, "
            "hf:<dataset>, or fortunes (the embedded corpus)"
        )
    if path.is_dir():
        raise DataError(f"data.source {path} is a directory; point it at one .txt/.jsonl(.gz)/.parquet file")
    identity = {**_file_identity(path), "text_field": cfg.text_field, "skip_bad_utf8": cfg.skip_bad_utf8}
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix == ".txt":
        read = _read_txt(path, cfg.skip_bad_utf8)
    elif suffixes in (".jsonl.gz", ".json.gz") or path.suffix == ".jsonl":
        read = _read_jsonl(path, cfg.text_field, cfg.skip_bad_utf8)
    elif path.suffix == ".parquet":
        read = _read_parquet(path, cfg.text_field)
    else:
        raise DataError(f"unsupported data.source file type {path.name!r}; use .txt, .jsonl, .jsonl.gz or .parquet")
    return TextSource(path.name, identity, read)
