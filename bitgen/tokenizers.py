"""Tokenizers: HF ``tokenizers`` loading and training, and the OWT second-stage code tokenizer.

- ``load_tokenizer(spec)``: a local ``tokenizer.json``, a BERT WordPiece ``vocab.txt``, GPT-2
  ``vocab.json`` + ``merges.txt`` (or a directory holding one of these), or a Hub name.
- ``train_bpe(texts, vocab_size, cache_dir)``: a deterministic byte-level BPE, cached on disk.
- ``CodeTokenizer``: the "gpt2id_bpe16" code tokenizer of spec §1.2 stage C. Each base id is one
  private-use character ``chr(base_char_offset + id)``; a BPE over those strings merges frequent
  id n-grams into codes. Training, window encoding (EOSEQ + PAD tail) and the §5.4 decode rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from bitgen.errors import BitgenError
from bitgen.hub import is_hub_spec, resolve, sibling
from bitgen.files import write_atomic

BPE_SPECIAL_TOKENS = ("<|endoftext|>",)
# Separator / end-of-document tokens, in order of preference, for the packing rules of spec §1.
SEPARATOR_TOKENS = ("[SEP]", "<|endoftext|>", "</s>", "[EOS]")
CODE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[EOSEQ]")
BASE_CHAR_OFFSET = 0xF0000  # Unicode supplementary private-use area A
_PUA_LIMIT = 0xFFFFE  # last usable code point of plane 15 is U+FFFFD


class TokenizerError(BitgenError, ValueError):
    """A tokenizer cannot be loaded or trained; the message names the problem and the fix."""


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Content hash of a tokenizer (its full JSON serialisation)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can produce, added/special tokens included."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def separator_id(tokenizer: Tokenizer) -> int:
    """Id of the document separator / end-of-text token (``[SEP]``, ``<|endoftext|>``, ...)."""
    for token in SEPARATOR_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise TokenizerError(
        f"the tokenizer has none of the separator tokens {SEPARATOR_TOKENS}; packing needs one "
        "to mark document boundaries: add one as a special token or use another tokenizer"
    )


# -- loading ----------------------------------------------------------------------------------
def _wordpiece(vocab_txt: Path, lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.WordPiece.from_file(str(vocab_txt), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _byte_level_bpe(vocab_json: Path, merges_txt: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tokenizer(spec: str | Path, *, lowercase: bool = True) -> Tokenizer:
    """Load a tokenizer from a local file/directory, or from the HF Hub by name.

    Local forms: ``tokenizer.json``; BERT ``vocab.txt`` (WordPiece, ``lowercase`` as in
    bert-base-uncased); GPT-2 ``vocab.json`` with ``merges.txt`` next to it; a directory with any
    of these; ``hf:OWNER/NAME/FILE[@REV]`` fetches a file (and the ``merges.txt`` beside a
    ``vocab.json``) through ``bitgen.hub``. Anything else that does not exist is treated as a Hub
    repo name such as ``gpt2`` (needs the network).
    """
    if is_hub_spec(spec):  # hf:OWNER/NAME/FILE[@REV] (with merges.txt beside a vocab.json) or a repo
        path = resolve(spec)
        if path.name == "vocab.json":
            resolve(sibling(str(spec), "merges.txt"))
        return load_tokenizer(path, lowercase=lowercase)
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt", "vocab.json"):
            if (path / name).exists():
                return load_tokenizer(path / name, lowercase=lowercase)
        raise TokenizerError(
            f"{path} holds no tokenizer.json, vocab.txt or vocab.json+merges.txt; point to the "
            "tokenizer file itself"
        )
    if path.exists():
        if path.suffix == ".json" and "vocab" in path.name:  # GPT-2 style vocab.json + merges.txt
            merges = path.parent / "merges.txt"
            if not merges.exists():
                raise TokenizerError(f"{path} is a BPE vocabulary but {merges} is missing; put merges.txt next to it")
            return _byte_level_bpe(path, merges)
        if path.suffix == ".json":
            return Tokenizer.from_file(str(path))
        if path.suffix == ".txt":
            return _wordpiece(path, lowercase)
        raise TokenizerError(f"unsupported tokenizer file {path}: expected tokenizer.json, vocab.txt or vocab.json")
    if path.suffix in (".json", ".txt") or str(spec).startswith((".", "/", "~")):
        raise TokenizerError(f"tokenizer file {path} does not exist; check data.tokenizer")
    try:
        # With HF_HUB_OFFLINE set, look only in the local Hub cache so offline runs fail at once
        # instead of retrying the network (read here: huggingface_hub reads it once at import).
        from huggingface_hub import hf_hub_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        return Tokenizer.from_file(
            hf_hub_download(str(spec), "tokenizer.json", local_files_only=offline))
    except Exception as err:  # the Hub client raises many error types when offline
        raise TokenizerError(
            f"could not fetch tokenizer {spec!r} from the Hugging Face Hub ({type(err).__name__}); "
            "offline? download its tokenizer.json (or vocab.txt / vocab.json+merges.txt) elsewhere and "
            "set data.tokenizer to that local path"
        ) from err


# -- byte-level BPE on a corpus ---------------------------------------------------------------
def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    cache_dir: str | Path | None = None,
    corpus_fingerprint: str | None = None,
) -> Tokenizer:
    """Train (or load from cache) a byte-level BPE with ``vocab_size`` ids, ``<|endoftext|>`` = id 0.

    Deterministic for the same texts and settings. The cache key is ``corpus_fingerprint``
    (required with ``cache_dir``: a cheap identity of ``texts``), the vocabulary size and the
    ``tokenizers`` version.
    """
    cache_path = None
    if cache_dir is not None:
        if corpus_fingerprint is None:
            raise TokenizerError("train_bpe: cache_dir needs a corpus_fingerprint to key the cache")
        key = hashlib.sha256(
            json.dumps([corpus_fingerprint, vocab_size, tokenizers.__version__, BPE_SPECIAL_TOKENS]).encode()
        ).hexdigest()[:20]
        cache_path = Path(cache_dir).expanduser() / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
        if cache_path.exists():
            return Tokenizer.from_file(str(cache_path))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(BPE_SPECIAL_TOKENS):
        raise TokenizerError(
            f"data.vocab_size={vocab_size} is smaller than the {len(alphabet)} byte symbols + "
            f"{len(BPE_SPECIAL_TOKENS)} special token(s) of a byte-level BPE; use at least "
            f"{len(alphabet) + len(BPE_SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=sorted(alphabet),  # sorted: a set's order would change the id order
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if cache_path is not None:
        write_atomic(cache_path, tok.to_str())
    return tok


# -- the OWT second-stage code tokenizer (gpt2id_bpe16) ---------------------------------------
def ids_to_pua(ids: Sequence[int] | np.ndarray, offset: int = BASE_CHAR_OFFSET) -> str:
    """Base ids -> one private-use character per id."""
    return "".join(map(chr, (np.asarray(ids, dtype=np.int64) + offset).tolist()))


@dataclass(frozen=True)
class CodeTokenizer:
    """A BPE over base-id strings (spec §1.2 stage C) plus its ``.meta.json`` fields."""

    tokenizer: Tokenizer
    pad_id: int
    unk_id: int
    eoseq_id: int
    base_char_offset: int
    base_vocab_size: int
    base_eos_id: int | None

    @property
    def code_vocab_size(self) -> int:
        """``actual_code_vocab_size`` of the meta file."""
        return vocab_size_of(self.tokenizer)

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Decoding stops at the first of these (spec §5.4)."""
        return (self.pad_id, self.eoseq_id)

    def meta(self) -> dict:
        return {
            "actual_code_vocab_size": self.code_vocab_size,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "eoseq_id": self.eoseq_id,
            "base_char_offset": self.base_char_offset,
            "base_vocab_size": self.base_vocab_size,
            "base_eos_id": self.base_eos_id,
        }

    def save(self, path: str | Path, extra_meta: dict | None = None) -> Path:
        """Write ``<path>`` (tokenizer JSON) and ``<path stem>.meta.json`` atomically; returns the meta path."""
        path = Path(path)
        meta_path = path.with_suffix(".meta.json")
        write_atomic(path, self.tokenizer.to_str())
        write_atomic(meta_path, json.dumps({**self.meta(), **(extra_meta or {})}, indent=2))
        return meta_path

    @classmethod
    def load(cls, path: str | Path) -> CodeTokenizer:
        """Load ``<name>.json`` and its ``<name>.meta.json`` (a local path or ``hf:`` file spec)."""
        if is_hub_spec(path):
            resolve(sibling(str(path), Path(str(path).partition("@")[0]).with_suffix(".meta.json").name))
            path = resolve(path)
        path = Path(path).expanduser()
        meta_path = path.with_suffix(".meta.json")
        for p in (path, meta_path):
            if not p.exists():
                raise TokenizerError(
                    f"code tokenizer file {p} is missing; train one with tools/train_code_tokenizer.py "
                    "or point data.code_tokenizer at an existing <name>.json with its <name>.meta.json"
                )
        meta = json.loads(meta_path.read_text())
        tok = Tokenizer.from_file(str(path))
        try:
            return cls(tok, int(meta["pad_id"]), int(meta["unk_id"]), int(meta["eoseq_id"]),
                       int(meta["base_char_offset"]), int(meta.get("base_vocab_size", 50257)),
                       meta.get("base_eos_id", 50256))
        except KeyError as err:
            raise TokenizerError(f"{meta_path} lacks the field {err}; re-create it with tools/train_code_tokenizer.py") from None

    def encode_windows(self, windows: np.ndarray, num_codes: int) -> np.ndarray:
        """Base-id windows ``[N, L]`` -> code rows ``[N, num_codes]`` (spec §1.2 stage D).

        Each row = BPE codes, then EOSEQ; truncated to ``num_codes`` with the last code forced to
        EOSEQ, or right-padded with PAD.
        """
        windows = np.asarray(windows)
        if windows.size and (windows.min() < 0 or windows.max() >= self.base_vocab_size):
            raise TokenizerError(
                f"base ids must lie in [0, {self.base_vocab_size}) for this code tokenizer; got "
                f"[{windows.min()}, {windows.max()}]"
            )
        encodings = self.tokenizer.encode_batch(
            [ids_to_pua(w, self.base_char_offset) for w in windows], add_special_tokens=False
        )
        dtype = np.uint16 if self.code_vocab_size <= 2**16 else np.uint32
        rows = np.full((len(encodings), num_codes), self.pad_id, dtype=dtype)
        for i, enc in enumerate(encodings):  # per window, not per token: ids are copied in bulk
            codes = enc.ids[: num_codes - 1]
            rows[i, : len(codes)] = codes
            rows[i, len(codes)] = self.eoseq_id
        return rows

    def decode_codes(self, codes: Sequence[int] | np.ndarray) -> list[int]:
        """One row of codes -> base ids, by the rules of spec §5.4.

        Stop at the first PAD/EOSEQ; keep ids < code vocab (UNK included), skip other invalid
        ids; BPE-decode; drop characters outside the base range; strip one leading and one
        trailing base EOS; an empty result becomes ``[base_eos_id]``.
        """
        codes = np.asarray(codes, dtype=np.int64)
        stops = np.flatnonzero((codes == self.pad_id) | (codes == self.eoseq_id))
        codes = codes[: stops[0] if stops.size else codes.size]
        kept = codes[(codes >= 0) & (codes < self.code_vocab_size)]
        text = "".join(self.tokenizer.id_to_token(int(c)) or "" for c in kept)
        lo, hi = self.base_char_offset, self.base_char_offset + self.base_vocab_size
        base = [ord(ch) - lo for ch in text if lo <= ord(ch) < hi]
        eos = self.base_eos_id
        if eos is not None:
            if base and base[0] == eos:
                base = base[1:]
            if base and base[-1] == eos:
                base = base[:-1]
            if not base:
                base = [eos]
        return base


def train_code_tokenizer(
    windows: Iterable[Sequence[int] | np.ndarray],
    *,
    base_vocab_size: int,
    code_vocab_size: int,
    base_eos_id: int | None,
    base_char_offset: int = BASE_CHAR_OFFSET,
    min_frequency: int = 2,
) -> CodeTokenizer:
    """Train the second-stage BPE on base-id windows (spec §1.2 stage C).

    One PUA line per window; specials ``[PAD] [UNK] [EOSEQ]`` (ids 0, 1, 2); initial alphabet =
    every base character; no normalizer or pre-tokenizer (a whole window is one "word").
    """
    if base_char_offset + base_vocab_size > _PUA_LIMIT:
        raise TokenizerError(
            f"{base_vocab_size} base ids do not fit in the private-use plane from "
            f"{base_char_offset:#x}; a base vocabulary of at most {_PUA_LIMIT - base_char_offset} is supported"
        )
    minimum = base_vocab_size + len(CODE_SPECIAL_TOKENS)
    if code_vocab_size < minimum:
        raise TokenizerError(
            f"code_vocab_size={code_vocab_size} is below the {base_vocab_size} base ids + "
            f"{len(CODE_SPECIAL_TOKENS)} specials; use at least {minimum}"
        )
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(
        vocab_size=code_vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(CODE_SPECIAL_TOKENS),
        initial_alphabet=[chr(base_char_offset + i) for i in range(base_vocab_size)],
        show_progress=False,
    )
    tok.train_from_iterator((ids_to_pua(w, base_char_offset) for w in windows), trainer=trainer)
    ids = [tok.token_to_id(t) for t in CODE_SPECIAL_TOKENS]
    return CodeTokenizer(tok, ids[0], ids[1], ids[2], base_char_offset, base_vocab_size, base_eos_id)

