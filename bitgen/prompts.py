"""Prompts and infills: text -> a row layout of given and generated token positions.

How text becomes a token prefix. A prompt TEXT is encoded by the run's text pipeline
(``TextCodec.encode_text``: the tokenizer without special tokens, then the code tokenizer when the
model has one) and placed at the start of the row, token 0 on, with no leading separator. The
prompt is refused unless decoding its ids alone through the run's pipeline (codec included)
gives TEXT back exactly: a normalising tokenizer (WordPiece lowercasing, accent stripping,
whitespace cleanup) cannot reproduce every text, and the message names the form it would write.

"Begins with". A sample's ids begin with the prompt's ids exactly (CoBit clamps their bits, AR
feeds them as the prefix). Its text, the decoded row, then begins with TEXT whenever the
tokenizer's decoder writes each token independently of the tokens after it: byte-level BPE (the
prompt's bytes are whole characters), the code tokenizer, and WordPiece, whose cleanup acts per
token in tokenizers 0.23. ``bitgen sample`` warns about any sample whose decoder joined across the
prompt's end anyway (``bitgen.generation.not_beginning_with_prompt``).

Infill syntax. ``[GAP:N]`` (N >= 1) in the text stands for N generated tokens; the text around
the markers is known. Each known segment is encoded on its own (so write the spaces you want on
the segment's side of the marker), e.g. ``the red cat[GAP:4] on the mat`` is the tokens of
``the red cat``, 4 generated tokens, the tokens of `` on the mat``, then generated tokens up to the
end of the row. Only families that generate every position at once (CoBit) take infills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitgen.errors import BitgenError
from bitgen.textcodec import TextCodec

GAP_MARKER = re.compile(r"\[GAP:([0-9]+)\]")
GAP_OPENING = "[GAP:"


class PromptError(BitgenError, ValueError):
    """A prompt the model cannot take (too long, empty, not reproducible, an infill for AR)."""


@dataclass(frozen=True)
class PromptLayout:
    """One prompt laid out over the first ``len(ids)`` tokens of a row.

    text: the prompt as given (gap markers included). ids: int64 [L] model ids, 0 in gaps.
    known: bool [L], True where the id is given. infill: whether the text had gap markers.
    """

    text: str
    ids: np.ndarray
    known: np.ndarray
    infill: bool

    @property
    def length(self) -> int:
        """L: tokens the layout covers (given and gap); the row's later tokens are generated."""
        return int(self.ids.shape[0])

    def known_bits(self, text: TextCodec, seq_bits: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask bool [seq_bits], bits uint8 [seq_bits]): the given tokens' codes under ``text``'s
        codec, True/their value on the P bits of each given token, False/0 elsewhere."""
        width = text.codec.width
        mask = np.zeros(seq_bits, bool)
        bits = np.zeros(seq_bits, np.uint8)
        mask[: self.length * width] = np.repeat(self.known, width)
        bits[: self.length * width] = np.asarray(text.codec.ids_to_bits(self.ids)) * mask[: self.length * width]
        return mask, bits


def _encode_known(text: TextCodec, segment: str) -> np.ndarray:
    """``segment`` -> model ids, refused unless they decode back to ``segment`` exactly."""
    ids = text.encode_text(segment)
    if ids.size and int(ids.max()) >= text.vocab_size:
        raise PromptError(f"{segment!r} encodes to id {int(ids.max())}, outside the model's "
                          f"{text.vocab_size} ids: the run's tokenizer and codec do not match")
    decoded = text.decode_bits(np.asarray(text.codec.ids_to_bits(ids))[None])[0].text if ids.size else ""
    if decoded != segment:
        raise PromptError(f"the run's tokenizer does not reproduce {segment!r} (it decodes to "
                          f"{decoded!r}: it normalises text, e.g. lowercasing or spacing); write the "
                          "prompt in that form")
    return ids


def _check_length(layout: PromptLayout, seq_tokens: int) -> PromptLayout:
    if layout.length > seq_tokens:
        raise PromptError(f"the prompt {layout.text!r} is {layout.length} tokens but the model's rows "
                          f"hold {seq_tokens}; shorten it")
    return layout


def prefix_prompt(text: TextCodec, prompt: str, seq_tokens: int) -> PromptLayout:
    """TEXT as the given first tokens of a ``seq_tokens`` row (module docstring)."""
    if not prompt.strip():
        raise PromptError("the prompt is empty; give the text samples should begin with")
    ids = _encode_known(text, prompt)
    return _check_length(PromptLayout(prompt, ids, np.ones(ids.shape, bool), infill=False), seq_tokens)


def infill_prompt(text: TextCodec, prompt: str, seq_tokens: int) -> PromptLayout:
    """Text with ``[GAP:N]`` markers as given and generated tokens of a row (module docstring)."""
    pieces = GAP_MARKER.split(prompt)  # known, N, known, N, ..., known
    segments, gaps = pieces[::2], [int(n) for n in pieces[1::2]]
    if any(GAP_OPENING in s for s in segments) or min(gaps, default=1) < 1:
        raise PromptError(f"the infill {prompt!r} has a malformed gap marker; write [GAP:N] with a "
                          "whole number N >= 1 of generated tokens")
    if not gaps:
        raise PromptError(f"the infill {prompt!r} has no gap marker; mark each gap as [GAP:N] "
                          "(N generated tokens), or use --prompt for a plain prefix")
    if not "".join(segments).strip():
        raise PromptError(f"the infill {prompt!r} has no known text; give text around the gaps")
    ids, known = [], []
    for i, segment in enumerate(segments):
        seg_ids = _encode_known(text, segment)
        ids.append(seg_ids)
        known.append(np.ones(seg_ids.shape, bool))
        if i < len(gaps):
            ids.append(np.zeros(gaps[i], np.int64))
            known.append(np.zeros(gaps[i], bool))
    layout = PromptLayout(prompt, np.concatenate(ids), np.concatenate(known), infill=True)
    return _check_length(layout, seq_tokens)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of the UTF-8 file ``path`` (the line break removed, nothing else)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptError(f"prompts file {path} does not exist; give a text file, one prompt per line")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()  # the final line break ends the last line, it does not start another
    lines = [line.removesuffix("\r") for line in lines]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise PromptError(f"{path} line {number} is blank; remove it (every line is one prompt)")
    if not lines:
        raise PromptError(f"prompts file {path} is empty; write one prompt per line")
    return lines


def layouts(text: TextCodec, seq_tokens: int, *, prompts: list[str] = (),
            infills: list[str] = ()) -> list[PromptLayout]:
    """Prefix prompts then infills, laid out for ``seq_tokens`` rows; errors name the prompt."""
    return ([prefix_prompt(text, p, seq_tokens) for p in prompts]
            + [infill_prompt(text, p, seq_tokens) for p in infills])
