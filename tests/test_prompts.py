"""Prompted and infilled sampling: text -> token layout (``bitgen.prompts``), the families' draws
with a prompt, and ``bitgen sample --prompt/--prompts/--infill`` on the tiny CoBit and AR runs of
tests/test_eval_cli.py (random parameters: a prompt must be kept whatever the model predicts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_eval_cli import ar_run, cobit_run, corpus  # noqa: F401  (module-scoped fixtures)

from bitgen import cli
from bitgen.codecs import BitCodec
from bitgen.generation import generate
from bitgen.loading import load_model
from bitgen.prompts import PromptError, infill_prompt, prefix_prompt, read_prompts
from bitgen.textcodec import TextCodec

# Words of the fixture corpus ("the {w} cat sat on mat number {i} while {w} dogs ran.").
WORDS = ["the", "red", "blue", "green", "cat", "sat", "on", "mat", "number", "while", "dogs", "ran."]
SEQ_TOKENS = 8  # the fixtures' model.seq_tokens
WIDTH = 9  # the fixtures' model.patch_size (bits per token)


def _records(out):
    return [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


def _head_bits(record, n_tokens):
    """The first n_tokens codes of a record's packed bits, as uint8 [n_tokens * WIDTH]."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(record["bits"]), np.uint8))[: n_tokens * WIDTH]


@pytest.fixture(scope="module")
def cobit_model(cobit_run):  # noqa: F811
    return load_model(str(cobit_run))


@pytest.fixture(scope="module")
def ar_model(ar_run):  # noqa: F811
    return load_model(str(ar_run))


def _short_prompts():
    """Texts of 1-3 corpus words (at most 8 tokens under the fixture BPE)."""
    return st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join)


# --------------------------------------------------------------------------------------------------
# Layouts


@given(prompt=_short_prompts())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_prefix_layout_is_the_tokenizer_encoding_and_its_bits(cobit_model, prompt):
    text = cobit_model.text
    layout = prefix_prompt(text, prompt, SEQ_TOKENS)
    ids = text.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert layout.ids.tolist() == ids and layout.known.all() and not layout.infill
    assert text.decode_ids(layout.ids) == prompt
    mask, bits = layout.known_bits(text, SEQ_TOKENS * WIDTH)
    assert mask.tolist() == [True] * (len(ids) * WIDTH) + [False] * ((SEQ_TOKENS - len(ids)) * WIDTH)
    np.testing.assert_array_equal(bits[: len(ids) * WIDTH], text.codec.ids_to_bits(np.asarray(ids)))
    assert not bits[len(ids) * WIDTH:].any()


@given(prompt=_short_prompts())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_prompts_through_a_code_tokenizer_round_trip(cobit_model, code_text, prompt):
    layout = prefix_prompt(code_text, prompt, 64)
    base = cobit_model.text.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert code_text.code_tokenizer.decode_codes(layout.ids) == base
    assert code_text.decode_bits(code_text.codec.ids_to_bits(layout.ids)[None])[0].text == prompt


@pytest.fixture(scope="module")
def code_text(cobit_model):
    """The fixture BPE with a second-stage code tokenizer trained on corpus sentences."""
    from bitgen.tokenizers import train_code_tokenizer, vocab_size_of

    base = cobit_model.text.tokenizer
    lines = [f"the {w} cat sat on mat number {i} while {w} dogs ran." for i in range(50) for w in WORDS[1:4]]
    windows = [base.encode(line).ids for line in lines]
    base_vocab = vocab_size_of(base)
    code = train_code_tokenizer(windows, base_vocab_size=base_vocab, code_vocab_size=base_vocab + 40,
                                base_eos_id=cobit_model.text.separator_id)
    codec = BitCodec(code.code_vocab_size, policy="stop", stop_ids=code.stop_ids, pad_id=code.pad_id)
    return TextCodec(base, codec, code)


def test_infill_layout_keeps_segments_and_gaps(cobit_model):
    text = cobit_model.text
    layout = infill_prompt(text, "the red[GAP:2] sat[GAP:1]", SEQ_TOKENS)
    head = text.encode_text("the red").tolist()
    tail = text.encode_text(" sat").tolist()
    n = len(head) + 2 + len(tail) + 1
    assert layout.infill and layout.length == n
    assert layout.known.tolist() == [True] * len(head) + [False] * 2 + [True] * len(tail) + [False]
    assert layout.ids[layout.known].tolist() == head + tail


def test_layout_errors_name_the_problem(cobit_model, tmp_path):
    text = cobit_model.text
    with pytest.raises(PromptError, match="shorten it"):
        prefix_prompt(text, " ".join(WORDS), SEQ_TOKENS)
    with pytest.raises(PromptError, match="empty"):
        prefix_prompt(text, "  ", SEQ_TOKENS)
    with pytest.raises(PromptError, match="no gap marker"):
        infill_prompt(text, "the cat", SEQ_TOKENS)
    for bad in ("the [GAP:x] cat", "the [GAP:0] cat", "the [GAP:2 cat"):
        with pytest.raises(PromptError, match="malformed gap marker"):
            infill_prompt(text, bad, SEQ_TOKENS)
    with pytest.raises(PromptError, match="no known text"):
        infill_prompt(text, "[GAP:3]", SEQ_TOKENS)
    with pytest.raises(PromptError, match="shorten it"):
        infill_prompt(text, "the[GAP:8]", SEQ_TOKENS)
    path = tmp_path / "p.txt"
    path.write_text("the cat\n\nred\n")
    with pytest.raises(PromptError, match="line 2 is blank"):
        read_prompts(path)
    path.write_text("the cat\r\n red \n")
    assert read_prompts(path) == ["the cat", " red "]


def test_a_normalising_tokenizer_refuses_what_it_cannot_reproduce(tmp_path):
    from bitgen.tokenizers import load_tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat"]) + "\n")
    text = TextCodec(load_tokenizer(vocab, lowercase=True), BitCodec(7))
    assert prefix_prompt(text, "the cat sat", SEQ_TOKENS).ids.tolist() == [4, 5, 6]
    with pytest.raises(PromptError, match="decodes to 'the cat'.*lowercasing"):
        prefix_prompt(text, "The Cat", SEQ_TOKENS)


def test_a_wordpiece_decoder_decodes_the_prompt_tokens_independently_of_the_next(tmp_path):
    """Why "begins with" holds for WordPiece too: its cleanup acts per token (tokenizers 0.23), so
    tokens after the prompt cannot rewrite it; ``not_beginning_with_prompt`` reports a decoder
    that would."""
    from bitgen.generation import Sample, not_beginning_with_prompt
    from bitgen.tokenizers import load_tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "it", "'", "s", ".", "##s"]) + "\n")
    text = TextCodec(load_tokenizer(vocab, lowercase=True), BitCodec(9))
    layout = prefix_prompt(text, "it '", SEQ_TOKENS)
    for next_id in range(4, 9):
        assert text.decode_ids([*layout.ids.tolist(), next_id]).startswith("it '")
    samples = [Sample("it's", (4, 5, 6), "", 0, 0, 0, "it '"), Sample("it ' s", (4, 5, 6), "", 0, 0, 1, "it '"),
               Sample("it", (4,), "", 0, 0, 2, None)]
    assert [s.index for s in not_beginning_with_prompt(samples)] == [0]


# --------------------------------------------------------------------------------------------------
# Library: generate(..., prompt=layout)


@given(prompt=_short_prompts())
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_cobit_sample_begins_with_the_prompt_and_its_bits(cobit_model, prompt):
    layout = prefix_prompt(cobit_model.text, prompt, SEQ_TOKENS)
    samples = generate(cobit_model, 4, 1, prompt=layout, progress=False)  # two micro-batches of 3
    head = cobit_model.text.codec.ids_to_bits(layout.ids)
    for s in samples:
        assert s.text.startswith(prompt) and s.prompt == prompt
        assert list(s.ids[: layout.length]) == layout.ids.tolist()
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(s.bits_hex), np.uint8))
        np.testing.assert_array_equal(bits[: head.size], head)


@given(prompt=_short_prompts())
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_ar_sample_begins_with_the_prompt(ar_model, prompt):
    layout = prefix_prompt(ar_model.text, prompt, SEQ_TOKENS)
    samples = generate(ar_model, 3, 2, prompt=layout, progress=False)
    for s in samples:
        assert s.text.startswith(prompt) and s.ids[: layout.length] == tuple(layout.ids.tolist())
        assert len(s.ids) == SEQ_TOKENS


def test_unprompted_cobit_samples_are_unchanged_by_the_prompt_path(cobit_model):
    """generate without a prompt takes the cond=None sampler (bit for bit its own reruns), and a
    prompt changes the draw (else the clamp would not reach the sampler)."""
    plain = generate(cobit_model, 3, 4, progress=False)
    again = generate(cobit_model, 3, 4, progress=False)
    prompted = generate(cobit_model, 3, 4, progress=False,
                        prompt=prefix_prompt(cobit_model.text, "the red cat", SEQ_TOKENS))
    assert [s.bits_hex for s in plain] == [s.bits_hex for s in again]
    assert all(s.prompt is None for s in plain)
    assert [s.bits_hex for s in prompted] != [s.bits_hex for s in plain]


# --------------------------------------------------------------------------------------------------
# CLI


def test_sample_cli_prompts_cobit_and_ar(cobit_run, ar_run, tmp_path):  # noqa: F811
    prompts = ["the red cat", "green dogs"]
    for run in (cobit_run, ar_run):
        out = tmp_path / f"{run.name}.txt"
        argv = ["sample", "--run-dir", str(run), "--num", "4", "--out", str(out), "--no-progress"]
        assert cli.main([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
        records = _records(out)
        assert [r["prompt"] for r in records] == [prompts[0]] * 4 + [prompts[1]] * 4
        assert [r["index"] for r in records] == list(range(8))
        assert all(r["text"].startswith(r["prompt"]) for r in records)
        blocks = out.read_text().split("=== ")[1:]
        assert [b.split("\n", 1)[1].startswith(r["prompt"]) for b, r in zip(blocks, records)] == [True] * 8
    text = load_model(str(cobit_run)).text
    for r in _records(tmp_path / f"{cobit_run.name}.txt"):  # the clamped bits are the prompt's codes
        ids = text.encode_text(r["prompt"])
        np.testing.assert_array_equal(_head_bits(r, ids.size), text.codec.ids_to_bits(ids))


def test_sample_cli_prompts_file_draws_num_per_line(cobit_run, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nblue dogs ran.\nsat on\n")
    out = tmp_path / "p.txt"
    assert cli.main(["sample", "--run-dir", str(cobit_run), "--prompts", str(prompts), "--num", "2",
                     "--seed", "5", "--out", str(out), "--no-progress"]) == 0
    records = _records(out)
    assert [r["prompt"] for r in records] == ["the cat"] * 2 + ["blue dogs ran."] * 2 + ["sat on"] * 2
    assert all(r["text"].startswith(r["prompt"]) and r["seed"] == 5 for r in records)


def test_sample_cli_infill_keeps_the_known_tokens_and_fills_the_gap(cobit_run, tmp_path):  # noqa: F811
    out = tmp_path / "infill.txt"
    infill = "the red[GAP:2] sat"
    assert cli.main(["sample", "--run-dir", str(cobit_run), "--infill", infill, "--num", "6",
                     "--out", str(out), "--no-progress"]) == 0
    model = load_model(str(cobit_run))
    layout = infill_prompt(model.text, infill, SEQ_TOKENS)
    known_bits = np.repeat(layout.known, WIDTH)
    expected = model.text.codec.ids_to_bits(layout.ids)
    records = _records(out)
    gaps = set()
    for r in records:
        assert r["prompt"] == infill and r["text"].startswith("the red")
        assert np.asarray(r["ids"][: layout.length])[layout.known].tolist() == layout.ids[layout.known].tolist()
        np.testing.assert_array_equal(_head_bits(r, layout.length)[known_bits], expected[known_bits])
        gaps.add(tuple(np.asarray(r["ids"][: layout.length])[~layout.known].tolist()))
    assert len(gaps) > 1  # the gap is drawn per sample, not copied from the layout's zeros


def test_sample_cli_prompt_errors_are_one_line(cobit_run, ar_run, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "x.txt")
    cases = [
        ([str(cobit_run), "--prompt", " ".join(WORDS)], "shorten it"),
        ([str(ar_run), "--infill", "the[GAP:2] cat"], "left to right"),
        ([str(cobit_run), "--prompts", str(tmp_path / "blank.txt")], "line 2 is blank"),
        ([str(cobit_run), "--prompts", str(tmp_path / "missing.txt")], "does not exist"),
    ]
    (tmp_path / "blank.txt").write_text("the cat\n   \n")
    for args, message in cases:
        assert cli.main(["sample", "--run-dir", *args, "--out", out, "--no-progress"]) == 2
        lines = capsys.readouterr().err.splitlines()  # the error, after the model's info line if loaded
        assert message in lines[-1] and all(line.startswith("bitgen sample: ") for line in lines), lines
        assert len(lines) == 1 or lines[0].startswith("bitgen sample: ar model from"), lines
