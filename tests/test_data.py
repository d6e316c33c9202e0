"""bitgen.data: packing rules, sources, caching, the grain pipeline and every bad-input error."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitgen.cli import main as cli_main
from bitgen.config import DataConfig
from bitgen.data import (
    DataError,
    StreamPacker,
    build_corpus_rows,
    make_batch_dataset,
    make_batch_iterator,
    pack,
    split_sizes,
)
from bitgen.data.cache import META_FILE, ROWS_FILE
from bitgen.tokenizers import train_bpe

SENTENCES = [f"sentence number {i} says {'hello ' * (i % 5)}world." for i in range(400)]


# -- packing (spec §1.1 / §1.2) on hand-checkable inputs --------------------------------------
def test_sep_packing_by_hand():
    # stream: 1 2 | 9 3 | 9 4 5 6 -> rows of 3, separator only between documents, tail dropped
    rows = pack([[1, 2], [3], [4, 5, 6]], seq_tokens=3, rule="sep", boundary_id=9)
    np.testing.assert_array_equal(rows, [[1, 2, 9], [3, 9, 4]])


def test_window_packing_by_hand():
    # stream: 1 2 E 3 E 4 (E=0 after every doc); window = [E] + 2 stream tokens + [E]
    rows = pack([[1, 2], [3], [4]], seq_tokens=4, rule="window", boundary_id=0)
    np.testing.assert_array_equal(rows, [[0, 1, 2, 0], [0, 0, 3, 0], [0, 0, 4, 0]])


@given(st.lists(st.lists(st.integers(1, 50), max_size=7), max_size=25), st.integers(1, 6),
       st.sampled_from(["sep", "window"]), st.integers(1, 5))
def test_streaming_packing_equals_one_shot(docs, seq_tokens, rule, chunk):
    seq_tokens += 2 if rule == "window" else 0
    packer = StreamPacker(seq_tokens, rule, 0)
    parts = [packer.push(docs[i:i + chunk]) for i in range(0, len(docs), chunk)]
    streamed = np.concatenate(parts) if parts else np.zeros((0, seq_tokens), np.int64)
    np.testing.assert_array_equal(streamed.reshape(-1, seq_tokens), pack(docs, seq_tokens, rule, 0))
    # Nothing but the tail is lost.
    body = streamed[:, 1:-1] if rule == "window" else streamed
    assert body.size + packer.pending_tokens == packer.stream_tokens


def test_split_sizes_follow_reference_rounding():
    assert split_sizes(1000, 0.005) == (995, 5)
    assert split_sizes(100, 0.005) == (100, 0)  # round(0.5) == 0 (Python rounding, as the reference)
    assert split_sizes(300, 0.005) == (298, 2)  # round(1.5) == 2
    with pytest.raises(DataError, match="val_fraction"):
        split_sizes(10, 1.0)


# -- corpus building, caching ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(SENTENCES, 320).save(str(path))
    return path


@pytest.fixture()
def cfg(tmp_path, tokenizer_file) -> DataConfig:
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(SENTENCES[:200]) + "\n\n")
    return DataConfig(source=str(txt), tokenizer=str(tokenizer_file), cache_dir=str(tmp_path / "cache"),
                      val_fraction=0.1, batch_size=8)


def test_build_rows_and_cache_reuse(cfg):
    packed = build_corpus_rows(cfg, 16)
    s = packed.stats
    assert s.documents == 200 and s.rows == packed.rows.shape[0] > 8 and packed.rows.shape[1] == 16
    assert s.tokens == s.rows * 16 + s.dropped_tail_tokens
    assert s.width == 9 and s.bits_per_row == 144 and s.invalid_code_headroom == 512 - 320
    assert s.train_rows + s.val_rows == s.rows and s.val_rows == round(0.1 * s.rows)
    assert s.cache_status.startswith("built")
    # The first row decodes back to the start of the corpus (separator between documents).
    text = packed.text_codec.decode_bits(packed.codec.ids_to_bits(packed.rows[:1]))[0].text
    assert text.startswith(SENTENCES[0] + "<|endoftext|>" + SENTENCES[1][:5])
    again = build_corpus_rows(cfg, 16)
    assert again.stats.cache_status == "reused" and isinstance(again.rows, np.memmap)
    np.testing.assert_array_equal(again.rows, packed.rows)
    assert dataclasses.replace(again.stats, cache_status="") == dataclasses.replace(s, cache_status="")


def test_cache_with_other_settings_is_rebuilt(cfg):
    first = build_corpus_rows(cfg, 16)
    cache = Path(first.stats.cache_path)
    meta = json.loads((cache / META_FILE).read_text())
    meta["fingerprint"]["seq_tokens"] = 99  # a sidecar written for other settings
    (cache / META_FILE).write_text(json.dumps(meta))
    rebuilt = build_corpus_rows(cfg, 16)
    assert "other settings (seq_tokens)" in rebuilt.stats.cache_status
    np.testing.assert_array_equal(rebuilt.rows, first.rows)
    with open(cache / ROWS_FILE, "r+b") as f:  # a truncated rows file
        f.truncate(10)
    assert "truncated" in build_corpus_rows(cfg, 16).stats.cache_status


def test_source_change_invalidates_cache(cfg):
    first = build_corpus_rows(cfg, 16)
    Path(cfg.source).write_text("\n".join(SENTENCES[200:]))
    second = build_corpus_rows(cfg, 16)
    assert second.stats.cache_status.startswith("built") and second.stats.cache_path != first.stats.cache_path


def test_interrupted_build_leaves_no_cache(cfg):
    with open(cfg.source, "ab") as f:
        f.write(b"fine line\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"invalid UTF-8 at byte offset \d+ \(line 203\).*skip_bad_utf8"):
        build_corpus_rows(cfg, 16)
    leftovers = [p.name for p in (Path(cfg.cache_dir) / "rows").rglob("*") if p.is_file()]
    assert leftovers == []


def test_bad_utf8_offset_and_skip(cfg):
    path = Path(cfg.source)
    good = "\n".join(SENTENCES[:200]).encode() + b"\n"
    path.write_bytes(good + b"ab\xc3(cd\n")
    with pytest.raises(DataError, match=f"byte offset {len(good) + 2} "):
        build_corpus_rows(cfg, 16)
    packed = build_corpus_rows(dataclasses.replace(cfg, skip_bad_utf8=True), 16)
    assert packed.stats.skipped_bad_utf8 == 1 and packed.stats.documents == 200


def test_jsonl_gz_and_parquet_sources_agree_with_txt(cfg, tmp_path):
    want = build_corpus_rows(cfg, 16).rows
    docs = SENTENCES[:200]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    for name in ("c.jsonl.gz", "c.parquet"):
        packed = build_corpus_rows(dataclasses.replace(cfg, source=str(tmp_path / name), text_field="body"), 16)
        np.testing.assert_array_equal(packed.rows, want)


def test_window_packing_with_base_ids(cfg):
    packed = build_corpus_rows(dataclasses.replace(cfg, packing="window"), 16)
    eos = packed.tokenizer.token_to_id("<|endoftext|>")
    assert (packed.rows[:, 0] == eos).all() and (packed.rows[:, -1] == eos).all()


def test_embedded_fortunes_defaults(tmp_path):
    packed = build_corpus_rows(DataConfig(cache_dir=str(tmp_path)), 128)
    s = packed.stats
    assert s.source == "fortunes" and s.documents == 14_307
    assert s.vocab_size == 8192 and s.width == 13 and s.bits_per_row == 128 * 13
    assert packed.rows.dtype == np.uint16 and s.rows > 5000


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": "/nonexistent/corpus.txt"}, "does not exist.*fortunes"),
        ({"source": "hf:lm1b"}, "datasets.*local .txt/.jsonl"),
        ({"source": "corpus.csv"}, "unsupported data.source file type"),
        ({"code_policy": "stop"}, "code_policy=stop needs"),
        ({"code_tokenizer": "x.json"}, "only with data.packing=window"),
        ({"bit_order": "perm.txt"}, "must be raw, gray"),
    ],
)
def test_bad_settings_errors(cfg, tmp_path, change, message):
    if change.get("source") == "corpus.csv":
        (tmp_path / "corpus.csv").write_text("a,b\n")
        change = {"source": str(tmp_path / "corpus.csv")}
    with pytest.raises(DataError, match=message):
        build_corpus_rows(dataclasses.replace(cfg, **change), 16)


def test_empty_and_too_small_corpus(cfg, tmp_path):
    Path(cfg.source).write_text("\n  \n\n")
    with pytest.raises(DataError, match="no documents"):
        build_corpus_rows(cfg, 16)
    Path(cfg.source).write_text("tiny\n")
    with pytest.raises(DataError, match="fewer than one row of 16; lower model.seq_tokens"):
        build_corpus_rows(cfg, 16)


def test_jsonl_missing_field(cfg, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="line 1 has no field 'text'.*data.text_field"):
        build_corpus_rows(dataclasses.replace(cfg, source=str(tmp_path / "c.jsonl")), 16)


# -- grain pipeline ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rows_and_codec(tokenizer_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    (tmp / "c.txt").write_text("\n".join(SENTENCES))
    cfg = DataConfig(source=str(tmp / "c.txt"), tokenizer=str(tokenizer_file), cache_dir=str(tmp / "cache"))
    packed = build_corpus_rows(cfg, 8)
    return packed.train_rows, packed.codec


def test_batches_are_a_pure_function_of_seed_and_index(rows_and_codec):
    rows, codec = rows_and_codec
    a = make_batch_dataset(rows, codec, global_batch=8, seed=3)
    b = make_batch_dataset(rows, codec, global_batch=8, seed=3)
    c = make_batch_dataset(rows, codec, global_batch=8, seed=4)
    for k in (0, 5, 1000):
        np.testing.assert_array_equal(a[k]["ids"], b[k]["ids"])
    assert not np.array_equal(a[0]["ids"], c[0]["ids"])
    batch = a[7]
    assert batch["bits"].dtype == np.uint8 and batch["bits"].shape == (8, 8 * codec.width)
    np.testing.assert_array_equal(batch["bits"], codec.ids_to_bits(batch["ids"]))
    it = make_batch_iterator(a)
    for k in range(3):
        np.testing.assert_array_equal(next(it)["ids"], a[k]["ids"])


def test_every_row_once_per_epoch(rows_and_codec):
    rows, codec = rows_and_codec
    n = (len(rows) // 4) * 4
    ds = make_batch_dataset(rows[:n], codec, global_batch=4, seed=0)
    seen = np.concatenate([ds[k]["ids"] for k in range(n // 4)])
    assert sorted(map(tuple, seen)) == sorted(map(tuple, np.asarray(rows[:n]).astype(np.int32)))


def test_iterator_resume_mid_epoch(rows_and_codec):
    rows, codec = rows_and_codec
    ds = make_batch_dataset(rows, codec, global_batch=4, seed=1)
    grain.experimental.assert_equal_output_after_checkpoint(ds[:12])  # the helper reads to the end
    it = make_batch_iterator(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it)["ids"] for _ in range(3)]
    resumed = make_batch_iterator(ds)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["ids"], want)
    np.testing.assert_array_equal(next(make_batch_iterator(ds, start_batch=5))["ids"], expected[0])


def test_iterator_state_through_orbax(rows_and_codec, tmp_path):
    import orbax.checkpoint as ocp

    rows, codec = rows_and_codec
    ds = make_batch_dataset(rows, codec, global_batch=4, seed=2)
    it = make_batch_iterator(ds)
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = next(it)["ids"]
        fresh = make_batch_iterator(ds)
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["ids"], want)


def test_two_processes_split_each_global_batch(rows_and_codec):
    rows, codec = rows_and_codec
    full = make_batch_dataset(rows, codec, global_batch=8, seed=5)
    parts = [make_batch_dataset(rows, codec, global_batch=8, seed=5, process_index=p, process_count=2)
             for p in range(2)]
    for k in (0, 3, 17):
        local = [p[k] for p in parts]
        assert all(b["ids"].shape[0] == 4 for b in local)
        np.testing.assert_array_equal(np.concatenate([b["ids"] for b in local]), full[k]["ids"])
        np.testing.assert_array_equal(np.concatenate([b["bits"] for b in local]), full[k]["bits"])


def test_pipeline_errors(rows_and_codec):
    rows, codec = rows_and_codec
    with pytest.raises(DataError, match="does not divide over 3 processes"):
        make_batch_dataset(rows, codec, global_batch=8, seed=0, process_count=3)
    with pytest.raises(DataError, match="fewer than one global batch.*data.batch_size"):
        make_batch_dataset(rows[:5], codec, global_batch=8, seed=0)
    with pytest.raises(DataError, match="process_index"):
        make_batch_dataset(rows, codec, global_batch=8, seed=0, process_index=2, process_count=2)


def test_cli_prints_statistics(cfg, capsys):
    code = cli_main(["data", f"data.source={cfg.source}", f"data.tokenizer={cfg.tokenizer}",
                     f"data.cache_dir={cfg.cache_dir}", "model.seq_tokens=16", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for key in ("documents", "tokens", "rows", "bits per token P", "bits per row", "invalid-code headroom",
                "cache", "row 0"):
        assert key in out
    assert "144" in out and "192 codes" in out


def test_window_packing_with_code_tokenizer_end_to_end(cfg, tmp_path):
    from bitgen.tokenizers import train_code_tokenizer, vocab_size_of

    window_cfg = dataclasses.replace(cfg, packing="window")
    base = build_corpus_rows(window_cfg, 16)
    eos = base.tokenizer.token_to_id("<|endoftext|>")
    code_tok = train_code_tokenizer(base.rows, base_vocab_size=vocab_size_of(base.tokenizer),
                                    code_vocab_size=vocab_size_of(base.tokenizer) + 40, base_eos_id=eos)
    code_tok.save(tmp_path / "codes.json")
    packed = build_corpus_rows(dataclasses.replace(window_cfg, code_tokenizer=str(tmp_path / "codes.json"),
                                                   code_policy="stop"), 16)
    assert packed.codec.policy == "stop" and packed.codec.stop_ids == (code_tok.pad_id, code_tok.eoseq_id)
    assert packed.stats.vocab_size == code_tok.code_vocab_size and packed.rows.shape == base.rows.shape
    for codes, window in zip(packed.rows[:10], base.rows[:10]):
        end = int(np.argmax(codes == code_tok.eoseq_id))
        assert (codes[end + 1:] == code_tok.pad_id).all()
        decoded = packed.codec.decode(packed.codec.ids_to_bits(codes[None]))
        assert decoded.length[0] == end
        assert packed.text_codec.decode_ids(decoded.ids[0, :end]) == base.tokenizer.decode(
            window[1:-1].tolist(), skip_special_tokens=False)
