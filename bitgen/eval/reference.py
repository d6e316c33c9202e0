"""Real-data reference rows and the token ids unigram entropy is measured on (spec §6.1, §6.2).

* ``entropy_ids(rows, ids)`` — the ids of one sample that unigram entropy counts: for a run on
  second-stage codes (OWT), the base GPT-2 ids the codes decode to (§5.4), else the ids themselves.
* ``reference_rows(model, reference, num)`` — the first ``num`` real rows to score next to the
  samples: the corpus's held-out tail (``heldout``) or the first rows of the test split
  (``test``: ``eval.test_source`` read, tokenised, packed and coded exactly like the training
  corpus, as the reference's first 1024 rows of its test loader).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bitgen.config import ConfigError

REFERENCES = ("heldout", "test")
_DOCS_PER_BATCH = 256  # documents tokenised per call while reading a test split


def entropy_ids(text, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids of one sample for unigram entropy (spec §6.2).

    ``text`` is the run's ``TextCodec``; ``ids`` are the generator's token ids (second-stage codes
    when the run has a code tokenizer: those are decoded to base ids first, stopping at the first
    PAD/EOSEQ and trimming the synthetic BOS/EOS as for the text).
    """
    if text.code_tokenizer is None:
        return np.asarray(ids)
    return np.asarray(text.code_tokenizer.decode_codes(ids))


def first_rows(model, source: str, num: int) -> np.ndarray:
    """The first ``num`` rows of ``source`` packed like the run's corpus: ``[n, T]`` ids (codes for
    a run on second-stage codes). Reads only as many documents as those rows need."""
    from bitgen.data.corpus import encode_documents
    from bitgen.data.packing import StreamPacker
    from bitgen.data.sources import DataError, open_source

    cfg, text = model.cfg, model.text
    seq_tokens = cfg.model.seq_tokens
    docs = open_source(dataclasses.replace(cfg.data, source=source)).documents()
    packer = StreamPacker(seq_tokens, cfg.data.packing, text.separator_id)
    chunks, have = [], 0
    # The training corpus's tokenisation (long documents in pieces), stopped once num rows exist.
    for ids in encode_documents(docs, text.tokenizer, cfg.data.max_document_chars,
                                {"split_documents": 0}, batch_docs=_DOCS_PER_BATCH):
        packed = packer.push(ids)
        if text.code_tokenizer is not None and len(packed):
            packed = text.code_tokenizer.encode_windows(packed, seq_tokens)
        chunks.append(np.asarray(packed))
        have += len(packed)
        if have >= num:
            break
    if have == 0:
        raise DataError(f"test split {source!r} holds less text than one row of {seq_tokens} tokens; "
                        "point eval.test_source at the test split or use --reference heldout")
    return np.concatenate(chunks)[:num]


def reference_label(model, reference: str, test_source: str = "") -> str:
    """``heldout`` or ``test:<source>`` (``test_source`` defaults to the run's ``eval.test_source``)."""
    if reference not in REFERENCES:
        raise ConfigError(f"reference={reference!r} is not one of {REFERENCES}")
    if reference == "heldout":
        return "heldout"
    source = test_source or model.cfg.eval.test_source
    if not source:
        raise ConfigError("--reference test needs the test split's data source: set "
                          "eval.test_source (e.g. hf:lm1b:test) or pass --test-source; the embedded "
                          "corpus has no test split, use --reference heldout")
    return f"test:{source}"


def reference_rows(model, reference: str, num: int, test_source: str = "") -> tuple[str, np.ndarray]:
    """(``reference_label``, the first ``num`` rows [n, T] of that reference)."""
    label = reference_label(model, reference, test_source)
    if label == "heldout":
        return label, np.asarray(model.rows.val_rows[:num])
    return label, first_rows(model, label.removeprefix("test:"), num)
