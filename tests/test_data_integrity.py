"""The whole source is always read and cached rows always match their source.

Covers: progress bars on (the default path) over more documents than one tokenizer batch, content
hashing of source files, the recorded read counts, caches of older formats, orphaned temporary
files of dead builders, and long documents tokenised in pieces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.cli import main as cli_main
from bitgen.config import DataConfig
from bitgen.data import DataError, build_corpus_rows
from bitgen.data.cache import CACHE_FORMAT_VERSION, META_FILE, ROWS_FILE, remove_orphaned_tmp_files
from bitgen.data.corpus import ENCODE_BATCH_DOCS, split_document
from bitgen.tokenizers import train_bpe

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def _doc(i: int) -> str:
    return " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 2 + i % 6)) + f" {i}."


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([_doc(i) for i in range(300)], 300).save(str(path))
    return path


@pytest.fixture()
def cfg(tmp_path, tokenizer_file) -> DataConfig:
    n_docs = 2 * ENCODE_BATCH_DOCS + 137  # more than two tokenizer batches (the bug read one)
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(_doc(i) for i in range(n_docs)) + "\n\n")  # + one empty record
    return DataConfig(source=str(txt), tokenizer=str(tokenizer_file), cache_dir=str(tmp_path / "cache"),
                      val_fraction=0.01, batch_size=8)


@pytest.mark.parametrize("progress", [True, False])
def test_every_document_is_read_with_and_without_progress(cfg, progress):
    n_docs = 2 * ENCODE_BATCH_DOCS + 137
    s = build_corpus_rows(cfg, 16, progress=progress).stats
    assert (s.documents, s.records, s.skipped_empty) == (n_docs, n_docs + 1, 1)
    # The packed stream holds every document's tokens plus one separator between documents.
    tok = build_corpus_rows(cfg, 16).tokenizer
    expected = sum(len(tok.encode(_doc(i), add_special_tokens=False).ids) for i in range(n_docs))
    assert s.tokens == expected + n_docs - 1


def test_cli_default_progress_reads_the_whole_source(cfg, capsys):
    """`bitgen data` as a user runs it (progress bars on) reports every document."""
    code = cli_main(["data", f"data.source={cfg.source}", f"data.tokenizer={cfg.tokenizer}",
                     f"data.cache_dir={cfg.cache_dir}", "model.seq_tokens=16", "--show", "0"])
    out = capsys.readouterr().out
    n_docs = 2 * ENCODE_BATCH_DOCS + 137
    assert code == 0 and f"{n_docs:,} read from {n_docs + 1:,} records (1 empty skipped)" in out
    assert "source hashed in" in out


def test_same_size_edit_with_restored_mtime_is_rebuilt(cfg):
    first = build_corpus_rows(cfg, 16)
    path = Path(cfg.source)
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[:5] = b"omega"  # "alpha" -> "omega": same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = build_corpus_rows(cfg, 16)
    assert second.stats.cache_status.startswith("built")
    assert second.stats.cache_path != first.stats.cache_path
    assert not np.array_equal(second.rows[:1], first.rows[:1])


def test_cache_records_format_and_counts(cfg):
    packed = build_corpus_rows(cfg, 16)
    meta = json.loads((Path(packed.stats.cache_path) / META_FILE).read_text())
    assert meta["fingerprint"]["format"] == CACHE_FORMAT_VERSION >= 2
    assert meta["stats"]["documents"] == packed.stats.documents
    assert meta["stats"]["records"] == packed.stats.records == meta["fingerprint"]["source"]["records"]


def _edit_sidecar(packed, section: str, key: str, value) -> None:
    """Overwrite one entry of a built cache's sidecar, as another writer or version would."""
    sidecar = Path(packed.stats.cache_path) / META_FILE
    meta = json.loads(sidecar.read_text())
    meta[section][key] = value
    sidecar.write_text(json.dumps(meta))


def test_cache_of_an_older_format_is_never_reused(cfg):
    packed = build_corpus_rows(cfg, 16)
    _edit_sidecar(packed, "fingerprint", "format", 1)  # as written by the previous cache format
    again = build_corpus_rows(cfg, 16)
    assert again.stats.cache_status.startswith("built") and "format" in again.stats.cache_status


def test_cache_whose_counts_disagree_with_the_source_stops(cfg):
    packed = build_corpus_rows(cfg, 16)
    _edit_sidecar(packed, "stats", "records", 2048)  # what a truncated read would have recorded
    with pytest.raises(DataError, match=rf"records 2,048 .* has {packed.stats.records:,}; delete .*--rebuild"):
        build_corpus_rows(cfg, 16)
    assert build_corpus_rows(cfg, 16, rebuild=True).stats.records == packed.stats.records


def test_orphaned_tmp_files_of_dead_builders_are_removed(cfg, tmp_path):
    cache = Path(build_corpus_rows(cfg, 16).stats.cache_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()
    orphan = cache / f".{ROWS_FILE}.{host}.{int(dead.stdout)}.abc123.tmp"
    live = cache / f".{ROWS_FILE}.{host}.{os.getpid()}.def456.tmp"
    foreign = cache / f".{ROWS_FILE}.other-host.{int(dead.stdout)}.ghi789.tmp"
    for p in (orphan, live, foreign):
        p.write_bytes(b"partial")
    assert remove_orphaned_tmp_files(cache.parent) == [orphan]
    assert not orphan.exists() and live.exists() and foreign.exists()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \n"), max_size=200), st.integers(1, 30))
def test_split_document_is_lossless_and_bounded(text, max_chars):
    pieces = split_document(text, max_chars)
    assert "".join(pieces) == text
    assert all(len(p) <= max_chars for p in pieces)
    # Cuts fall before whitespace whenever the window has some (after its first character).
    for before, after in zip(pieces, pieces[1:]):
        window = (before + after)[1:max_chars]
        if " " in window or "\n" in window:
            assert after[0] in " \n"


def test_long_document_is_tokenised_in_pieces(cfg):
    long_doc = " ".join(_doc(i) for i in range(3000))  # ~60k characters on one line
    Path(cfg.source).write_text(_doc(0) + "\n" + long_doc + "\n" + _doc(1) + "\n")
    whole = build_corpus_rows(cfg, 16).stats
    split_cfg = dataclasses.replace(cfg, max_document_chars=5000)
    pieces = build_corpus_rows(split_cfg, 16).stats
    assert whole.split_documents == 0 and pieces.split_documents == 1
    assert pieces.documents == whole.documents == 3
    # Cutting before a space keeps byte-level BPE words intact: the same tokens either way.
    assert pieces.tokens == whole.tokens
    np.testing.assert_array_equal(build_corpus_rows(split_cfg, 16).rows, build_corpus_rows(cfg, 16).rows)
    with pytest.raises(DataError, match="max_document_chars"):  # library callers; the CLI validates first
        build_corpus_rows(dataclasses.replace(cfg, max_document_chars=0), 16)


def test_frequency_rank_codes_by_hand():
    from bitgen.data.corpus import frequency_rank_codes

    rows = np.array([[2, 2, 2, 0], [3, 3, 0, 2]])  # counts: id0 2, id1 0, id2 4, id3 2
    # id2 most frequent -> 0; ids 0 and 3 tie -> id order (1, 2); unseen id1 last -> 3
    np.testing.assert_array_equal(frequency_rank_codes(rows, 4), [1, 3, 0, 2])


def test_frequency_bit_order_round_trips_and_puts_frequent_tokens_on_low_codes(cfg):
    packed = build_corpus_rows(dataclasses.replace(cfg, bit_order="frequency"), 16)
    rows = np.asarray(packed.train_rows[:64])
    decoded = packed.codec.decode(packed.codec.ids_to_bits(rows))
    np.testing.assert_array_equal(decoded.ids, rows)
    counts = np.bincount(np.asarray(packed.train_rows, np.int64).ravel(), minlength=packed.codec.vocab_size)
    top = int(np.argmax(counts))
    assert not packed.codec.ids_to_bits(np.array([[top]])).any()  # the most frequent id is code 0


def test_a_run_keeps_its_code_map_and_refuses_another(cfg, tmp_path):
    from bitgen.data.corpus import CODE_MAP_FILE, pin_code_map

    run = tmp_path / "run"
    freq = dataclasses.replace(cfg, bit_order="frequency")
    pin_code_map(run, build_corpus_rows(cfg, 16).codec, write=True)  # raw ids: nothing to keep
    assert not (run / CODE_MAP_FILE).exists()
    codec = build_corpus_rows(freq, 16).codec
    pin_code_map(run, codec, write=False)  # readers never write
    assert not (run / CODE_MAP_FILE).exists()
    pin_code_map(run, codec, write=True)
    pin_code_map(run, codec, write=False)  # the same map again: accepted
    # Other training rows (here: another held-out split) rank the ids differently.
    other = build_corpus_rows(dataclasses.replace(freq, val_fraction=0.5), 16).codec
    assert not np.array_equal(other.permutation.id_to_code, codec.permutation.id_to_code)
    with pytest.raises(DataError, match="differs from the one this run was trained with.*--run-dir"):
        pin_code_map(run, other, write=True)


def test_a_read_that_ends_short_is_refused_and_not_cached(cfg, monkeypatch):
    """The bug this module guards against: a reader closed early (as tqdm closed it) must not be
    cached as if it were the whole corpus."""
    import itertools

    from bitgen.data.sources import TextSource

    whole = TextSource.documents
    monkeypatch.setattr(TextSource, "documents", lambda self, stats=None: itertools.islice(whole(self, stats), 10))
    records = 2 * ENCODE_BATCH_DOCS + 137 + 1  # the fixture's documents and its one empty line
    with pytest.raises(DataError, match=rf"read 10 records of .*expected {records} .*nothing was cached"):
        build_corpus_rows(cfg, 16)
    assert not list((Path(cfg.cache_dir) / "rows").rglob(META_FILE))
