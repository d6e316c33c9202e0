"""The rows the block samplers (BitLM, block CoBit) return, and their decoding.

A row is int32 [2, T]: the ids, and a status per position: 0 given or generated, 1 generated from
a code that names no id (the invalid-code rate), 2 not generated (after the early stop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from bitgen.textcodec import DecodedText, TextCodec

INVALID_CODE, NOT_GENERATED = 1, 2


def block_status(block_ids: jax.Array, given: jax.Array, invalid: jax.Array, done: jax.Array,
                 stop_id: int) -> tuple[jax.Array, jax.Array]:
    """The status [B, m] of one decoded block and whether each row stopped in it [B].

    block_ids, given, invalid: [B, m] (given: a prompt's position; invalid: drawn from a code that
    names no id); done [B]: rows that stopped in an earlier block. Positions of a done row, and
    those after the first generated ``stop_id`` of the block, are not generated."""
    stops = (~given) & (block_ids == stop_id)
    after_stop = (jnp.cumsum(stops, axis=1) - stops) > 0
    status = jnp.where(done[:, None] | after_stop, NOT_GENERATED, (invalid & ~given).astype(jnp.int32))
    return status, jnp.any(stops, axis=1)


def decode_block_rows(out: np.ndarray, text: TextCodec) -> list[tuple[DecodedText, str]]:
    """Rows [B, 2, T] -> (text of the given and generated positions, "") per row; a row's
    ``n_invalid`` counts its status-1 positions."""
    from bitgen.textcodec import DecodedText

    rows = []
    for ids, status in np.asarray(out):
        kept = ids[status != NOT_GENERATED]
        rows.append((DecodedText(text.decode_ids(kept), tuple(int(i) for i in kept),
                                 int(np.sum(status == INVALID_CODE))), ""))
    return rows
