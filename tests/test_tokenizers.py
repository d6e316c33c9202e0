"""bitgen.tokenizers: loading, byte-level BPE training/caching, and the second-stage code tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from bitgen.config import DataConfig
from bitgen.data.sources import open_source
from bitgen.tokenizers import (
    CodeTokenizer,
    TokenizerError,
    load_tokenizer,
    separator_id,
    tokenizer_hash,
    train_bpe,
    train_code_tokenizer,
    vocab_size_of,
)

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["Hello, world!", "  leading space and\ttab\nnewline", "naïve café — 東京 🙂", "x" * 300, ""]


@pytest.fixture(scope="session")
def fortunes_texts() -> list[str]:
    return list(open_source(DataConfig()).documents())


@pytest.fixture(scope="session")
def fortunes_bpe(fortunes_texts, tmp_path_factory) -> tuple[Tokenizer, Path]:
    cache = tmp_path_factory.mktemp("bpe-cache")
    tok = train_bpe(fortunes_texts, 8192, cache_dir=cache, corpus_fingerprint="fortunes-test")
    return tok, cache


def test_fortunes_bpe_vocab_and_round_trip(fortunes_bpe, fortunes_texts):
    tok, _ = fortunes_bpe
    assert vocab_size_of(tok) == 8192
    assert separator_id(tok) == 0  # <|endoftext|> is the first special token
    for text in TEXTS + fortunes_texts[:200]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert max(ids, default=0) < 8192
        assert tok.decode(ids) == text


def test_bpe_cache_is_reused(fortunes_bpe, fortunes_texts):
    tok, cache = fortunes_bpe
    files = list((cache / "tokenizers").glob("bpe-8192-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = train_bpe(iter(()), 8192, cache_dir=cache, corpus_fingerprint="fortunes-test")  # no texts needed
    assert tokenizer_hash(again) == tokenizer_hash(tok) and files[0].stat().st_mtime_ns == mtime


def test_bpe_training_is_deterministic(fortunes_texts):
    subset = fortunes_texts[:1500]
    first, second = (train_bpe(subset, 600) for _ in range(2))
    assert tokenizer_hash(first) == tokenizer_hash(second)


def test_bpe_vocab_too_small():
    with pytest.raises(TokenizerError, match="at least 257"):
        train_bpe(["abc"], 100)


def test_bpe_cache_needs_fingerprint(tmp_path):
    with pytest.raises(TokenizerError, match="corpus_fingerprint"):
        train_bpe(["abc"], 300, cache_dir=tmp_path)


def test_load_tokenizer_json_and_directory(fortunes_bpe, tmp_path):
    tok, _ = fortunes_bpe
    tok.save(str(tmp_path / "tokenizer.json"))
    for spec in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
        assert tokenizer_hash(load_tokenizer(spec)) == tokenizer_hash(tok)


def test_load_gpt2_style_vocab_and_merges(fortunes_bpe, tmp_path):
    tok, _ = fortunes_bpe
    tok.model.save(str(tmp_path))  # writes vocab.json + merges.txt, GPT-2's file layout
    loaded = load_tokenizer(tmp_path / "vocab.json")
    text = "The quick brown fox, 12 times."
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert loaded.decode(loaded.encode(text).ids) == text


def test_load_bert_wordpiece_vocab(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "!", ",", "wor", "##ld", "un", "##aff"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    enc = tok.encode("Hello, World! unaff", add_special_tokens=False)
    assert enc.tokens == ["hello", ",", "world", "!", "un", "##aff"]
    assert separator_id(tok) == 3
    assert tok.decode(enc.ids) == "hello, world! unaff"


def test_load_missing_file_names_the_setting(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist; check data.tokenizer"):
        load_tokenizer(tmp_path / "nope.json")


def test_load_by_name_offline_names_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match="set data.tokenizer to that local path"):
        load_tokenizer("bitgen-test/no-such-tokenizer")


def test_separator_missing():
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(TokenizerError, match="separator tokens"):
        separator_id(tok)


# -- second-stage code tokenizer (spec §1.2 stage C, §5.4) on a small synthetic id stream -------
BASE_VOCAB, EOS = 24, 23


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    """Windows [EOS] + body + [EOS] whose bodies repeat a few motifs, so BPE has merges to learn."""
    motifs = [[3, 4, 5], [7, 7, 8, 9], [10, 11], [EOS, 12]]
    stream = np.concatenate([motifs[i % 4] + [i % 20] for i in range(600)])
    body = stream[: (stream.size // 30) * 30].reshape(-1, 30)
    edge = np.full((body.shape[0], 1), EOS)
    return np.concatenate([edge, body, edge], axis=1)


@pytest.fixture(scope="module")
def code_tok(windows) -> CodeTokenizer:
    return train_code_tokenizer(windows, base_vocab_size=BASE_VOCAB, code_vocab_size=64, base_eos_id=EOS)


def test_code_tokenizer_layout(code_tok):
    assert (code_tok.pad_id, code_tok.unk_id, code_tok.eoseq_id) == (0, 1, 2)
    assert code_tok.code_vocab_size == 64
    # Specials first, then every base character as a single-id code.
    for base_id in range(BASE_VOCAB):
        assert code_tok.tokenizer.token_to_id(chr(code_tok.base_char_offset + base_id)) is not None


def test_code_tokenizer_training_is_deterministic(windows, code_tok):
    again = train_code_tokenizer(windows, base_vocab_size=BASE_VOCAB, code_vocab_size=64, base_eos_id=EOS)
    assert tokenizer_hash(again.tokenizer) == tokenizer_hash(code_tok.tokenizer)


def test_encode_windows_eoseq_then_pad(code_tok, windows):
    rows = code_tok.encode_windows(windows[:8], 32)
    assert rows.shape == (8, 32) and rows.dtype == np.uint16
    for row in rows:
        end = int(np.argmax(row == code_tok.eoseq_id))
        assert end < 31  # BPE compressed the 32-token window
        assert (row[end + 1:] == code_tok.pad_id).all()
        assert not np.isin(row[:end], code_tok.stop_ids).any()


def test_encode_windows_truncates_with_eoseq_last(code_tok, windows):
    rows = code_tok.encode_windows(windows[:4], 3)
    assert (rows[:, -1] == code_tok.eoseq_id).all()


def test_code_round_trip_strips_one_leading_and_trailing_eos(code_tok, windows):
    rows = code_tok.encode_windows(windows, windows.shape[1])
    for window, row in zip(windows, rows):
        assert code_tok.decode_codes(row) == window[1:-1].tolist()


def test_decode_codes_rules(code_tok):
    single = {b: code_tok.tokenizer.token_to_id(chr(code_tok.base_char_offset + b)) for b in (5, 6, EOS)}
    pad, eoseq, unk = code_tok.pad_id, code_tok.eoseq_id, code_tok.unk_id
    # invalid code 999 is skipped, UNK contributes no base char, decoding stops at PAD.
    assert code_tok.decode_codes([single[EOS], single[5], 999, unk, single[6], pad, single[5]]) == [5, 6]
    assert code_tok.decode_codes([single[5], eoseq, single[6]]) == [5]
    assert code_tok.decode_codes([single[EOS], single[EOS], single[5], single[EOS], single[EOS]]) == [EOS, 5, EOS]
    assert code_tok.decode_codes([eoseq]) == [EOS]  # empty -> placeholder EOS


def test_code_tokenizer_save_load(code_tok, tmp_path):
    meta_path = code_tok.save(tmp_path / "codes.json", extra_meta={"note": "test"})
    meta = json.loads(meta_path.read_text())
    assert meta["actual_code_vocab_size"] == 64 and meta["base_char_offset"] == 0xF0000
    loaded = CodeTokenizer.load(tmp_path / "codes.json")
    assert loaded.meta() == code_tok.meta()
    (tmp_path / "codes.meta.json").unlink()
    with pytest.raises(TokenizerError, match="train_code_tokenizer.py"):
        CodeTokenizer.load(tmp_path / "codes.json")


def test_code_tokenizer_errors(windows):
    with pytest.raises(TokenizerError, match="at least 27"):
        train_code_tokenizer(windows, base_vocab_size=BASE_VOCAB, code_vocab_size=20, base_eos_id=EOS)
    with pytest.raises(TokenizerError, match="private-use plane"):
        train_code_tokenizer(windows, base_vocab_size=70000, code_vocab_size=80000, base_eos_id=EOS)


def test_train_code_tokenizer_tool(windows, tmp_path, monkeypatch):
    np.save(tmp_path / "windows.npy", windows)
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    sys.modules.pop("train_code_tokenizer", None)
    import train_code_tokenizer as tool

    out = tmp_path / "codes.json"
    assert tool.main(["--windows", str(tmp_path / "windows.npy"), "--base-vocab-size", str(BASE_VOCAB),
                      "--eos-id", str(EOS), "--code-vocab-size", "64", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["eoseq_id"] == 2 and meta["codes_per_window_mean"] < windows.shape[1]
    assert CodeTokenizer.load(out).decode_codes(CodeTokenizer.load(out).encode_windows(windows[:1], 40)[0]) \
        == windows[0, 1:-1].tolist()
