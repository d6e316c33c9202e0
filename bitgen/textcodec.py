"""Text <-> ids <-> bits for one model: its tokenizer, the optional second-stage code tokenizer
and its bit codec, as one object that can be saved beside a model and loaded without the corpus.

A run directory (and an exported model folder) keeps it in ``tokenizer/``::

    tokenizer/tokenizer.json             the base tokenizer (HF ``tokenizers`` JSON)
    tokenizer/code_tokenizer.json        the second-stage code tokenizer, when the model uses one
    tokenizer/code_tokenizer.meta.json   ... and its special ids
    tokenizer/codec.json                 vocabulary size V, width P, policy, pad/stop ids, code order
    tokenizer/code_map.npy               the id -> code map, when the code order is a map

``decode_bits`` is the one bits -> text decoder (spec §5.4): training samples, ``bitgen sample``,
``bitgen eval`` and ``bitgen data`` all go through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from bitgen.codecs import BitCodec, IdCodeMap
from bitgen.errors import BitgenError
from bitgen.tokenizers import CodeTokenizer, ids_to_pua, separator_id, write_atomic

TOKENIZER_DIR = "tokenizer"
CODEC_FILE = "codec.json"
CODEC_FORMAT = 1


class TextCodecError(BitgenError, ValueError):
    """A saved text pipeline is missing or unreadable; the message names the file and the fix."""


class DecodedText(NamedTuple):
    """One decoded sequence: text, token ids at the decoded length, codes naming no token."""

    text: str
    ids: tuple[int, ...]
    n_invalid: int


@dataclass(frozen=True)
class TextCodec:
    """tokenizer: base ids <-> text; code_tokenizer: model ids (codes) <-> base ids, or None when
    the model's ids are the base ids; codec: model ids <-> P-bit codes."""

    tokenizer: Tokenizer
    codec: BitCodec
    code_tokenizer: CodeTokenizer | None = None

    @property
    def vocab_size(self) -> int:
        """V: the number of ids the model generates."""
        return self.codec.vocab_size

    @property
    def separator_id(self) -> int:
        """The base tokenizer's separator / end-of-document id (the AR start token)."""
        return separator_id(self.tokenizer)

    def encode_text(self, text: str) -> np.ndarray:
        """Text -> model ids ``[T]`` int64: the base tokenizer without special tokens (no separator
        is added; special tokens written in ``text`` still map to their ids), then the code
        tokenizer when the model has one (no EOSEQ is appended)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.code_tokenizer is not None:
            pua = ids_to_pua(ids, self.code_tokenizer.base_char_offset)
            ids = self.code_tokenizer.tokenizer.encode(pua, add_special_tokens=False).ids
        return np.asarray(ids, np.int64)

    def decode_ids(self, ids) -> str:
        """One row of model ids ``[T]`` -> text."""
        ids = np.asarray(ids).tolist()
        if self.code_tokenizer is not None:
            ids = self.code_tokenizer.decode_codes(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_bits(self, bits) -> list[DecodedText]:
        """Bits ``[B, T*P]`` -> one ``DecodedText`` per row, under the codec's invalid-code policy."""
        decoded = self.codec.decode(np.asarray(bits))
        return [DecodedText(self.decode_ids(ids[:length]), tuple(int(i) for i in ids[:length]), int(bad))
                for ids, length, bad in zip(decoded.ids, decoded.length, decoded.n_invalid)]

    def save(self, directory: str | Path) -> Path:
        """Write the files listed in the module docstring into ``directory``; returns it."""
        directory = Path(directory)
        write_atomic(directory / "tokenizer.json", self.tokenizer.to_str())
        if self.code_tokenizer is not None:
            self.code_tokenizer.save(directory / "code_tokenizer.json")
        permutation = self.codec.permutation
        if isinstance(permutation, IdCodeMap):
            tmp = directory / ".code_map.tmp.npy"
            np.save(tmp, permutation.id_to_code)
            tmp.replace(directory / "code_map.npy")
        codec = {"format": CODEC_FORMAT, "vocab_size": self.codec.vocab_size,
                 "width": self.codec.width, "policy": self.codec.policy, "pad_id": self.codec.pad_id,
                 "stop_ids": list(self.codec.stop_ids),
                 "code_order": "map" if isinstance(permutation, IdCodeMap) else permutation or "raw",
                 "code_tokenizer": self.code_tokenizer is not None}
        write_atomic(directory / CODEC_FILE, json.dumps(codec, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TextCodec:
        """Read a directory written by ``save``."""
        directory = Path(directory).expanduser()
        codec_path = directory / CODEC_FILE
        if not codec_path.is_file():
            raise TextCodecError(f"{codec_path} does not exist: {directory} holds no saved tokenizer "
                                 "and codec (runs store them in <run>/tokenizer/)")
        try:
            spec = json.loads(codec_path.read_text())
            if spec.get("format") != CODEC_FORMAT:
                raise TextCodecError(f"{codec_path} has format {spec.get('format')!r}; this bitgen "
                                     f"reads format {CODEC_FORMAT}: upgrade bitgen")
            order = spec["code_order"]
            if order not in ("raw", "gray", "map"):
                raise TextCodecError(f"{codec_path} has code_order={order!r}, not raw, gray or map; "
                                     "copy the tokenizer folder again from the run")
            permutation = {"raw": None, "gray": "gray"}.get(order)
            if order == "map":
                permutation = IdCodeMap.from_array(np.load(directory / "code_map.npy"))
            code_tokenizer = (CodeTokenizer.load(directory / "code_tokenizer.json")
                              if spec["code_tokenizer"] else None)
            codec = BitCodec(spec["vocab_size"], width=spec["width"], policy=spec["policy"],
                             pad_id=spec["pad_id"], stop_ids=tuple(spec["stop_ids"]),
                             permutation=permutation)
            return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), codec, code_tokenizer)
        except BitgenError:
            raise
        except Exception as err:  # a damaged or hand-edited file: name it, whatever the parser raised
            raise TextCodecError(f"cannot read the saved tokenizer/codec in {directory} "
                                 f"({type(err).__name__}: {err}); copy it again from the run") from err


def run_text_codec(run_dir: str | Path) -> TextCodec | None:
    """The text pipeline saved in ``<run_dir>/tokenizer/``, or None for runs saved without one."""
    directory = Path(run_dir) / TOKENIZER_DIR
    return TextCodec.load(directory) if (directory / CODEC_FILE).is_file() else None


def pin_run_text_codec(run_dir: str | Path, text: TextCodec, *, write: bool) -> None:
    """Keep the text pipeline a run trains with in ``<run_dir>/tokenizer/`` and refuse another.

    Written on first use (``write``: process 0); afterwards a corpus whose tokenizer or codec
    differs (changed data settings, a frequency map rebuilt from other rows) would decode the
    model's bits into other tokens, so it stops the run.
    """
    from bitgen.tokenizers import tokenizer_hash

    saved = run_text_codec(run_dir)
    if saved is None:
        if write:
            text.save(Path(run_dir) / TOKENIZER_DIR)
        return
    if saved.codec != text.codec or tokenizer_hash(saved.tokenizer) != tokenizer_hash(text.tokenizer):
        raise TextCodecError(
            f"the tokenizer/codec built from the current data settings differs from the one this run "
            f"was trained with ({Path(run_dir) / TOKENIZER_DIR}): data.source, the tokenizer or "
            "data.val_fraction changed; restore the run's data settings (its config.json) or start "
            "a new --run-dir")
