"""Packing tokenised documents into fixed-length rows (spec §1.1 and §1.2).

Both rules concatenate all documents, in order, into one stream and cut it into
non-overlapping rows; the incomplete tail is dropped, so rows never need padding.

- ``sep`` (LM1B): the separator goes *between* documents (not before the first); rows are
  consecutive ``T``-token chunks of the stream.
- ``window`` (OWT stage B): EOS goes *after every* document; row i is
  ``[EOS] + stream[i*(T-2):(i+1)*(T-2)] + [EOS]`` (GPT-2 uses EOS as BOS).

``StreamPacker`` works incrementally so corpora larger than memory can be packed batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from bitgen.errors import BitgenError

PACKING_RULES = ("sep", "window")


class PackingError(BitgenError, ValueError):
    """Invalid packing settings; the message names the fix."""


class StreamPacker:
    """Incremental packer: ``push(docs)`` returns the rows completed so far, ``[k, T]`` int64."""

    def __init__(self, seq_tokens: int, rule: str, boundary_id: int):
        if rule not in PACKING_RULES:
            raise PackingError(f"packing rule {rule!r} is not one of {PACKING_RULES}")
        min_tokens = 3 if rule == "window" else 1
        if seq_tokens < min_tokens:
            raise PackingError(f"packing={rule} needs at least {min_tokens} tokens per row, got {seq_tokens}")
        self.seq_tokens = seq_tokens
        self.rule = rule
        self.boundary_id = int(boundary_id)
        # Stream tokens per row: the window rule spends two tokens on BOS/EOS.
        self.chunk = seq_tokens - 2 if rule == "window" else seq_tokens
        self._carry = np.zeros(0, np.int64)
        self._started = False
        self.stream_tokens = 0  # tokens entering the stream, separators included

    @property
    def pending_tokens(self) -> int:
        """Tokens waiting for a row; after the last push these are the dropped tail."""
        return int(self._carry.size)

    def push(self, docs: Iterable[Sequence[int]]) -> np.ndarray:
        boundary = np.array([self.boundary_id], np.int64)
        pieces = [self._carry]
        for doc in docs:
            doc = np.asarray(doc, np.int64)
            if self.rule == "sep":
                pieces.extend([boundary, doc] if self._started else [doc])
            else:
                pieces.extend([doc, boundary])
            self._started = True
        stream = np.concatenate(pieces)
        self.stream_tokens += stream.size - self._carry.size
        n_rows = stream.size // self.chunk
        body = stream[: n_rows * self.chunk].reshape(n_rows, self.chunk)
        self._carry = stream[n_rows * self.chunk:]
        if self.rule == "sep":
            return body
        edge = np.full((n_rows, 1), self.boundary_id, np.int64)
        return np.concatenate([edge, body, edge], axis=1)


def pack(docs: Iterable[Sequence[int]], seq_tokens: int, rule: str, boundary_id: int) -> np.ndarray:
    """Pack a whole corpus at once; ``[N, T]`` int64 rows, tail dropped."""
    return StreamPacker(seq_tokens, rule, boundary_id).push(docs)
