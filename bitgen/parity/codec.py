"""Parity of ``bitgen.codecs`` with ``codec.npz`` (official id <-> bit tables and decode rules).

Widths come from the array shapes and vocabulary sizes from the full tables / manifest, so
fixtures with other widths work. Everything runs through ``jax.jit`` with the codec static, the
way samplers and the data pipeline use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.codecs import BitCodec, bits_to_ids, ids_to_bits
from bitgen.parity import CheckResult, compare, load_npz

OWT_BASE_VOCAB = 50257  # GPT-2; used when the manifest does not state it


def _owt_base_vocab(fixture_dir: Path) -> int:
    manifest = Path(fixture_dir) / "manifest.json"
    if manifest.exists():
        meaning = (json.loads(manifest.read_text()).get("files", {}).get("codec.npz", {})
                   .get("arrays", {}).get("owt_base_decode_token_ids", {}).get("meaning", ""))
        found = re.search(r"vocab (\d+)", meaning)
        if found:
            return int(found.group(1))
    return OWT_BASE_VOCAB


def _encode(ids: np.ndarray, width: int) -> np.ndarray:
    return np.asarray(jax.jit(ids_to_bits, static_argnums=1)(jnp.asarray(ids, jnp.uint32), width))


def _decode(codec: BitCodec, bits: np.ndarray):
    return jax.jit(lambda b: codec.decode(b))(jnp.asarray(bits, jnp.uint8))


def checks(fixture_dir: Path) -> Iterator[CheckResult]:
    d = load_npz(fixture_dir, "codec.npz")
    for tag in ("p15", "p16"):
        ids, want = d[f"{tag}_ids"], d[f"{tag}_bits"]
        width = want.shape[-1]
        yield compare(f"codec/{tag}_rows (ids -> bits)", _encode(ids[None], width)[0].reshape(-1, width), want,
                      rtol=0, atol=0)
        table = d[f"{tag}_full_table"]
        got = _encode(np.arange(table.shape[0])[None], width)[0].reshape(-1, width)
        yield compare(f"codec/{tag}_full_table", got, table, rtol=0, atol=0)
        yield compare(f"codec/{tag}_full_table (bits -> ids)",
                      np.asarray(jax.jit(bits_to_ids, static_argnums=1)(jnp.asarray(table), width))[:, 0],
                      np.arange(table.shape[0]), rtol=0, atol=0)

    lm1b_bits = d["lm1b_decode_bitstream"]
    width = d["p15_bits"].shape[-1]
    lm1b_vocab = d["p15_full_table"].shape[0]
    yield compare("codec/lm1b_raw_codes", np.asarray(bits_to_ids(jnp.asarray(lm1b_bits, jnp.uint8), width)),
                  d["lm1b_decode_raw_codes"], rtol=0, atol=0)
    lm1b = BitCodec(lm1b_vocab, width=width, policy="modulo")
    decoded = _decode(lm1b, lm1b_bits)
    yield compare("codec/lm1b_modulo_decode", decoded.ids, d["lm1b_decode_token_ids"], rtol=0, atol=0,
                  note=f"V={lm1b_vocab}, {int(decoded.n_invalid.sum())} invalid codes")

    ids, stream = d["lm1b_roundtrip_ids"], d["lm1b_roundtrip_bitstream"]
    yield compare("codec/lm1b_roundtrip (ids -> bits)", _encode(ids, width), stream, rtol=0, atol=0)
    yield compare("codec/lm1b_roundtrip (bits -> ids)", _decode(lm1b, stream).ids, ids, rtol=0, atol=0)

    owt_bits = d["owt_base_decode_bitstream"]
    owt_vocab = _owt_base_vocab(fixture_dir)
    owt = BitCodec(owt_vocab, width=owt_bits.shape[-1] // d["owt_base_decode_codes"].shape[0], policy="modulo")
    yield compare("codec/owt_base_modulo_decode", _decode(owt, owt_bits).ids, d["owt_base_decode_token_ids"],
                  rtol=0, atol=0, note=f"V={owt_vocab}")
