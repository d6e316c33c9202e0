"""The i.i.d.-unigram control row: counts, draws, scoring like samples, reuse from results.jsonl."""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.data.corpus import token_counts
from bitgen.eval.controls import UNIGRAM_MODEL, draw_unigram, unigram_control


def test_counts_cover_every_id(monkeypatch):
    from bitgen.data import corpus

    rows = np.array([[0, 3, 3], [3, 1, 0], [4, 4, 4]], np.uint16)
    np.testing.assert_array_equal(token_counts(rows, 5), [2, 1, 0, 3, 3])
    monkeypatch.setattr(corpus, "COUNT_CHUNK_ROWS", 2)  # counted across chunks, same result
    np.testing.assert_array_equal(token_counts(rows, 5), [2, 1, 0, 3, 3])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=8, max_size=8).filter(any), st.integers(0, 2**31 - 1))
def test_draws_stay_on_the_support_and_are_a_function_of_the_key(counts, seed):
    counts = np.asarray(counts)
    ids = draw_unigram(counts, jax.random.key(seed), (4, 16))
    assert ids.shape == (4, 16) and (counts[ids] > 0).all()
    np.testing.assert_array_equal(ids, draw_unigram(counts, jax.random.key(seed), (4, 16)))


def test_draw_frequencies_match_the_counts():
    """20,000 draws from p = (0.1, 0.2, 0.7): each frequency lies within 5 binomial standard
    deviations (sqrt(p(1-p)/n) <= 0.0033), a bound a correct sampler breaks with probability < 1e-6."""
    counts = np.array([1, 2, 7])
    ids = draw_unigram(counts, jax.random.key(0), (100, 200))
    p = counts / counts.sum()
    freq = np.bincount(ids.ravel(), minlength=3) / ids.size
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / ids.size)).all()


class _Rows:
    """A stand-in for PackedRows: token rows, a codec with a vocabulary, a text decoder."""

    class codec:  # noqa: N801 - mirrors the attribute name of PackedRows
        vocab_size = 4

    class stats:  # noqa: N801
        seq_tokens = 6

    train_rows = np.array([[0, 1, 1, 2, 2, 2]] * 3)

    class text_codec:  # noqa: N801
        code_tokenizer = None

        @staticmethod
        def decode_ids(ids) -> str:
            return " ".join("abcd"[int(i)] for i in ids)


def test_control_rows_are_scored_like_samples_and_reused(tmp_path, monkeypatch):
    from bitgen.eval import controls

    scored = []

    def fake_score(texts, ids, evaluator):
        scored.append((list(texts), [list(map(int, i)) for i in ids]))
        return 100.0 + len(scored), 1.0

    monkeypatch.setattr(controls, "score_samples", fake_score)
    evaluator = type("E", (), {"name": "judge"})()
    out = tmp_path / "results.jsonl"
    rows = unigram_control(_Rows, evaluator, out, seeds=(0, 1), num=5)
    assert [r["model"] for r in rows] == [UNIGRAM_MODEL] * 2 and [r["seed"] for r in rows] == [0, 1]
    texts, ids = scored[0]
    assert len(texts) == 5 and all(len(i) == 6 for i in ids)
    assert texts[0] == _Rows.text_codec.decode_ids(ids[0]) and not any("d" in t for t in texts)  # id 3 unseen
    again = unigram_control(_Rows, evaluator, out, seeds=(0, 1), num=5)
    assert len(scored) == 2 and [r["genppl"] for r in again] == [r["genppl"] for r in rows]
    unigram_control(_Rows, evaluator, out, seeds=(2,), num=5)  # a new seed is drawn and scored
    assert len(scored) == 3 and len(out.read_text().splitlines()) == 3
