"""Control rows for sample-quality tables: text with known structure, scored like samples.

``unigram_control_row`` draws every token independently from the training rows' unigram
distribution (separators included), decodes and scores the rows exactly like model samples.
``bitgen demo`` adds it to its table; ``bitgen eval --control`` adds it to a sweep. A
generator that only learned which tokens are frequent lands here; one that learned any context
beats it. Rows go through ``cached_row`` so an interrupted evaluation reuses them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.data.corpus import token_counts
from bitgen.eval.reference import entropy_ids
from bitgen.eval.sweep import SCORING_VERSION, Evaluator, read_rows, score_samples
from bitgen.eval.table import POINT_KEYS

UNIGRAM_MODEL = "iid unigram"


def draw_unigram(counts: np.ndarray, key: jax.Array, shape: tuple[int, int]) -> np.ndarray:
    """``shape`` token ids drawn i.i.d. with probabilities proportional to ``counts``."""
    logits = jnp.log(jnp.asarray(counts, jnp.float32))  # log 0 = -inf: unseen ids are never drawn
    return np.asarray(jax.random.categorical(key, logits, shape=shape))


def unigram_control_row(rows, evaluator: Evaluator, *, seed: int, num: int) -> dict[str, Any]:
    """One seed of the i.i.d.-unigram control: ``num`` rows of the corpus's row length.

    ``rows`` is the run's ``PackedRows``; counts come from its training rows only.
    """
    start = time.perf_counter()
    counts = token_counts(rows.train_rows, rows.codec.vocab_size)
    ids = draw_unigram(counts, jax.random.key(seed), (num, rows.stats.seq_tokens))
    texts = [rows.text_codec.decode_ids(r) for r in ids]
    ppl, entropy = score_samples(texts, [entropy_ids(rows.text_codec, r) for r in ids], evaluator)
    return {**{k: None for k in POINT_KEYS}, "model": UNIGRAM_MODEL, "evaluator": evaluator.name,
            "seed": seed, "n": num, "scoring": SCORING_VERSION, "genppl": ppl, "entropy": entropy,
            "n_invalid_mean": 0.0, "seconds": time.perf_counter() - start}


def unigram_control(rows, evaluator: Evaluator, out_jsonl: Path, *, seeds, num: int) -> list[dict[str, Any]]:
    """``unigram_control_row`` for each seed, reused from ``out_jsonl`` when already there."""
    cached = {(r["seed"], r["n"]): r for r in read_rows(out_jsonl)
              if r["model"] == UNIGRAM_MODEL and r["evaluator"] == evaluator.name
              and r.get("scoring") == SCORING_VERSION}
    out = []
    for seed in seeds:
        row = cached.get((seed, num))
        if row is None:
            row = unigram_control_row(rows, evaluator, seed=seed, num=num)
            out_jsonl.parent.mkdir(parents=True, exist_ok=True)
            with out_jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
        out.append(row)
    return out
