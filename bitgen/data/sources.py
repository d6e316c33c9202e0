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
spec §1.2) and empty documents are dropped. A source has an ``identity`` (a JSON-able dict) that
keys on-disk caches: for files it holds a SHA-256 of the content and the number of raw records
(lines, or parquet rows), so an edited file is never mistaken for the cached one, whatever its size
and modification time. Reading a source counts every raw record, so a consumer can check that it
read the whole source (``ReadStats.complete``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bitgen.config import DataConfig
from bitgen.errors import BitgenError

NORMALISATION_VERSION = 1  # bump when normalize_document changes: it invalidates caches
HF_PREFIX = "hf:"


class DataError(BitgenError, ValueError):
    """Bad data input or settings; the message names the problem and the fix."""


def normalize_document(text: str) -> str:
    """Unify line endings and strip outer whitespace (spec §1.2 text normalisation)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


@dataclass
class ReadStats:
    """Counters filled while a source is read.

    ``records`` counts raw records (lines, rows) including empty and skipped ones; ``exhausted``
    turns true only when the reader reached the end of the source.
    """

    documents: int = 0
    skipped_bad_utf8: int = 0
    skipped_empty: int = 0
    records: int = 0
    exhausted: bool = False

    def complete(self, expected_records: int | None) -> bool:
        """True when the whole source was read (and, where known, every record was seen)."""
        return self.exhausted and (expected_records is None or self.records == expected_records)


@dataclass(frozen=True)
class TextSource:
    """A named, fingerprinted stream of documents."""

    name: str
    identity: dict
    _read: Callable[[ReadStats], Iterator[str]] = field(repr=False)
    identity_seconds: float = 0.0  # time spent hashing/counting the source for its identity

    @property
    def records(self) -> int | None:
        """Raw records in the source (lines or rows), where known without reading it."""
        return self.identity.get("records")

    def documents(self, stats: ReadStats | None = None) -> Iterator[str]:
        """Yield normalised, non-empty documents, counting them in ``stats``."""
        stats = ReadStats() if stats is None else stats
        for text in self._read(stats):
            text = normalize_document(text)
            if text:
                stats.documents += 1
                yield text
            else:
                stats.skipped_empty += 1
        stats.exhausted = True


def fortunes_path() -> Path:
    return Path(str(resources.files("bitgen") / "assets" / "fortunes" / "fortunes.jsonl.gz"))


HASH_CHUNK_BYTES = 1 << 20


def content_identity(path: Path, *, count_lines: bool) -> dict:
    """SHA-256 of the file's bytes, its size, and (``count_lines``) its number of lines.

    Lines are counted as the readers see them: in the decompressed stream for ``.gz`` files, a
    last line without a newline included.
    """
    digest, lines, last = hashlib.sha256(), 0, b"\n"
    plain = count_lines and path.suffix != ".gz"  # count while hashing: one pass over the bytes
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            if plain:
                lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    if count_lines and not plain:  # lines of the decompressed stream, as the readers see them
        with gzip.open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    identity = {"sha256": digest.hexdigest(), "size": path.stat().st_size}
    if count_lines:
        identity["records"] = lines + (last != b"\n")
    return identity


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
            stats.records += 1
            text = _decode_line(raw, path, offset, lineno, skip_bad_utf8, stats)
            if text is not None:
                yield text

    return read


def _read_jsonl(path: Path, text_field: str, skip_bad_utf8: bool) -> Callable[[ReadStats], Iterator[str]]:
    def read(stats: ReadStats) -> Iterator[str]:
        for lineno, offset, raw in _iter_lines(path):
            stats.records += 1
            if not raw.strip():
                stats.skipped_empty += 1
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
            for text in batch.column(0).to_pylist():
                stats.records += 1
                if text is None:
                    stats.skipped_empty += 1
                else:
                    yield text

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
            for text in batch[text_field]:
                stats.records += 1
                if text is None:
                    stats.skipped_empty += 1
                else:
                    yield text

    identity = {"hf": name, "split": split, "fingerprint": getattr(ds, "_fingerprint", None),
                "text_field": text_field, "records": len(ds)}
    return TextSource(f"hf-{name}-{split}", identity, read)


def open_source(cfg: DataConfig) -> TextSource:
    """Resolve ``cfg.source`` into a ``TextSource`` (files are checked now, read lazily)."""
    spec = cfg.source
    if spec.startswith(HF_PREFIX):
        return _open_hf(spec, cfg.text_field)
    started = time.perf_counter()
    if spec == "fortunes":
        path = fortunes_path()
        identity = {"embedded": "fortunes", **content_identity(path, count_lines=True)}
        return TextSource("fortunes", identity, _read_jsonl(path, "text", skip_bad_utf8=False),
                          time.perf_counter() - started)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source file {path} does not exist; give an existing .txt/.jsonl(.gz)/.parquet file, "
            "hf:<dataset>, or fortunes (the embedded corpus)"
        )
    if path.is_dir():
        raise DataError(f"data.source {path} is a directory; point it at one .txt/.jsonl(.gz)/.parquet file")
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix == ".txt":
        read = _read_txt(path, cfg.skip_bad_utf8)
    elif suffixes in (".jsonl.gz", ".json.gz") or path.suffix == ".jsonl":
        read = _read_jsonl(path, cfg.text_field, cfg.skip_bad_utf8)
    elif path.suffix == ".parquet":
        read = _read_parquet(path, cfg.text_field)
    else:
        raise DataError(f"unsupported data.source file type {path.name!r}; use .txt, .jsonl, .jsonl.gz or .parquet")
    identity = {"path": str(path.resolve()), "text_field": cfg.text_field,
                "skip_bad_utf8": cfg.skip_bad_utf8,
                **content_identity(path, count_lines=path.suffix != ".parquet")}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        identity["records"] = pq.ParquetFile(path).metadata.num_rows
    return TextSource(path.name, identity, read, time.perf_counter() - started)
