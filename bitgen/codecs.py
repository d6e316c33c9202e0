"""Token ids <-> fixed-width bit codes (spec §1.3, §5.4).

A token id becomes a P-bit code written MSB first; token t of a row occupies bits
``[t*P, (t+1)*P)`` (token-major flattening), so ids ``[..., T]`` <-> bits ``[..., T*P]``.
Bits are {0, 1} (uint8), or {0., 1.} float32 for the diffusion ("analog bits").

Every function is pure and vectorised. It follows the array type it is given: numpy in ->
numpy out (the host data pipeline), jax arrays or tracers in -> jax out (inside ``jax.jit``).
Codes are handled as uint32 so P = 32 does not overflow JAX's default 32-bit signed ints;
ids come back as int32 whenever they fit (vocabularies up to 2^31).

Codes that name no token (``code >= V`` when ``2^P > V``) are resolved by ``BitCodec.policy``:
``modulo`` (LM1B rule: id = code mod V), ``stop`` (OWT rule: stop at the first stop id, skip
invalid codes) or ``nearest`` (the valid id whose code is closest in Hamming distance).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.errors import BitgenError

MAX_WIDTH = 32
# ``nearest`` uses a 2^P lookup table; beyond this width it would not fit comfortably in memory.
MAX_NEAREST_WIDTH = 20
POLICIES = ("modulo", "stop", "nearest")


class CodecError(BitgenError, ValueError):
    """Invalid codec settings; the message names the problem and the fix."""


def _xp(x: Any):
    """numpy for host arrays, jax.numpy for jax arrays and tracers."""
    return jnp if isinstance(x, jax.Array) else np


def _id_dtype(max_id_exclusive: int):
    return np.int32 if max_id_exclusive <= 2**31 else np.uint32


def width_for_vocab(vocab_size: int) -> int:
    """Bits per token P = ceil(log2 V) (at least 1); raises CodecError when P > 32."""
    if vocab_size < 1:
        raise CodecError(f"vocabulary size must be >= 1, got {vocab_size}")
    width = max(1, (vocab_size - 1).bit_length())
    if width > MAX_WIDTH:
        raise CodecError(
            f"a vocabulary of {vocab_size} ids needs {width} bits per token, more than the "
            f"{MAX_WIDTH} bits supported; use a smaller vocabulary (e.g. data.vocab_size)"
        )
    return width


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_WIDTH:
        raise CodecError(f"code width must be in [1, {MAX_WIDTH}] bits, got {width}")


def codes_to_bits(codes, width: int):
    """Codes ``[..., T]`` (any integer dtype, values < 2^width) -> uint8 bits ``[..., T*width]``, MSB first."""
    _check_width(width)
    xp = _xp(codes)
    codes = xp.asarray(codes).astype(xp.uint32)
    shifts = xp.arange(width - 1, -1, -1, dtype=xp.uint32)
    bits = (codes[..., None] >> shifts) & xp.uint32(1)
    return bits.astype(xp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] * width)


def bits_to_codes(bits, width: int):
    """Bits ``[..., T*width]`` (uint8/bool; floats are thresholded at 0.5) -> uint32 codes ``[..., T]``."""
    _check_width(width)
    xp = _xp(bits)
    bits = xp.asarray(bits)
    if bits.shape[-1] % width:
        raise CodecError(
            f"last axis has {bits.shape[-1]} bits, not a multiple of the code width {width}"
        )
    if xp.issubdtype(bits.dtype, xp.floating):
        bits = bits > 0.5
    grouped = bits.astype(xp.uint32).reshape(*bits.shape[:-1], bits.shape[-1] // width, width)
    shifts = xp.arange(width - 1, -1, -1, dtype=xp.uint32)
    return xp.sum(grouped << shifts, axis=-1, dtype=xp.uint32)


def ids_to_bits(ids, width: int):
    """Raw-binary encoding: ids ``[..., T]`` -> uint8 bits ``[..., T*width]`` (code = id)."""
    return codes_to_bits(ids, width)


def bits_to_ids(bits, width: int):
    """Raw-binary decoding without any invalid-code policy: bits ``[..., T*width]`` -> ids ``[..., T]``.

    int32 for width < 32, uint32 for width 32.
    """
    xp = _xp(bits)
    return bits_to_codes(bits, width).astype(xp.dtype(_id_dtype(2**width)))


def gray_encode(n):
    """Reflected binary Gray code g = n ^ (n >> 1) (elementwise, unsigned)."""
    xp = _xp(n)
    n = xp.asarray(n).astype(xp.uint32)
    return n ^ (n >> xp.uint32(1))


def gray_decode(g):
    """Inverse of ``gray_encode``: prefix XOR of the higher bits (elementwise, uint32)."""
    xp = _xp(g)
    n = xp.asarray(g).astype(xp.uint32)
    for shift in (1, 2, 4, 8, 16):  # log2(32) doubling steps, not a loop over tokens
        n = n ^ (n >> xp.uint32(shift))
    return n


@dataclass(frozen=True, eq=False)
class IdCodeMap:
    """An arbitrary injective id -> code map (e.g. the "semantic bits" ablation, spec §1.3).

    ``id_to_code[i]`` is the code of id i, all distinct and < 2^width. The map is extended to a
    bijection of the whole code space: unused codes, in increasing order, stand for the invalid
    indices V, V+1, ..., so invalid-code policies work exactly as for raw codes.
    Hashable by content so a codec holding it can be a static ``jax.jit`` argument.
    """

    id_to_code: np.ndarray  # [V] uint32
    _sorted_codes: np.ndarray = field(repr=False)  # [V] uint32, ascending
    _sorted_ids: np.ndarray = field(repr=False)  # [V] int64, id of each sorted code
    _digest: str = field(repr=False)

    @classmethod
    def from_array(cls, id_to_code) -> IdCodeMap:
        codes = np.asarray(id_to_code)
        if codes.ndim != 1 or codes.size == 0:
            raise CodecError(f"an id->code map must be a non-empty 1-D array, got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise CodecError(f"an id->code map must hold integers, got dtype {codes.dtype}")
        if codes.min() < 0 or codes.max() >= 2**MAX_WIDTH:
            raise CodecError(f"id->code map values must lie in [0, 2^{MAX_WIDTH})")
        codes = codes.astype(np.uint32)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        if np.any(sorted_codes[1:] == sorted_codes[:-1]):
            dup = int(sorted_codes[1:][sorted_codes[1:] == sorted_codes[:-1]][0])
            raise CodecError(f"id->code map is not invertible: code {dup} is used twice")
        for a in (codes, sorted_codes, order):
            a.setflags(write=False)
        digest = hashlib.sha256(codes.tobytes()).hexdigest()
        return cls(codes, sorted_codes, order.astype(np.int64), digest)

    def __hash__(self) -> int:
        return hash(self._digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdCodeMap) and other._digest == self._digest

    @property
    def vocab_size(self) -> int:
        return int(self.id_to_code.size)

    def encode(self, ids):
        """ids ``[...]`` (< V) -> uint32 codes."""
        xp = _xp(ids)
        return xp.asarray(self.id_to_code)[ids]

    def decode(self, codes):
        """uint32 codes ``[...]`` -> uint32 index: the id for mapped codes, V + rank among unused codes otherwise."""
        xp = _xp(codes)
        sorted_codes = xp.asarray(self._sorted_codes)
        pos = xp.searchsorted(sorted_codes, codes)
        found_pos = xp.minimum(pos, sorted_codes.shape[0] - 1)
        found = sorted_codes[found_pos] == codes
        ids = xp.asarray(self._sorted_ids)[found_pos].astype(xp.uint32)
        # ``pos`` mapped codes lie below an unused code, so it is unused code number (code - pos).
        unused_rank = codes - pos.astype(xp.uint32)
        return xp.where(found, ids, xp.uint32(self.vocab_size) + unused_rank)


class Decoded(NamedTuple):
    """Result of ``BitCodec.decode`` for bits ``[..., T*P]``.

    ids: ``[..., T]`` token ids; with policy ``stop`` the kept ids are left-aligned and
      positions ``>= length`` hold the fill id (``pad_id`` or 0).
    n_invalid: ``[...]`` int32, codes in the row that name no token (counted over the whole row).
    length: ``[...]`` int32, number of meaningful ids (T unless the policy is ``stop``).
    """

    ids: Any
    n_invalid: Any
    length: Any


@dataclass(frozen=True)
class BitCodec:
    """Bit encoding of a vocabulary: V ids, P-bit codes, a code order and an invalid-code policy.

    Frozen and hashable, so it can be passed to ``jax.jit`` as a static argument.

    vocab_size: V. width: P, defaults to ceil(log2 V). policy: ``modulo`` | ``stop`` | ``nearest``.
    pad_id: fill id after the stop position (``stop`` policy); stop_ids: ids that end a sequence
    under ``stop``. permutation: None (raw binary, code = id), ``"gray"`` (code = gray(id)) or an
    ``IdCodeMap``.
    """

    vocab_size: int
    width: int | None = None
    policy: str = "modulo"
    pad_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    permutation: None | str | IdCodeMap = None

    def __post_init__(self) -> None:
        needed = width_for_vocab(self.vocab_size)
        if self.width is None:
            object.__setattr__(self, "width", needed)
        _check_width(self.width)
        if self.width < needed:
            raise CodecError(
                f"width {self.width} bits cannot hold {self.vocab_size} ids (needs {needed}); "
                "leave width unset to derive it"
            )
        if self.policy not in POLICIES:
            raise CodecError(f"policy {self.policy!r} is not one of {POLICIES}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        for name, value in [("pad_id", self.pad_id)] + [("stop_ids", s) for s in self.stop_ids]:
            if value is not None and not 0 <= value < self.vocab_size:
                raise CodecError(f"{name} {value} is outside the vocabulary [0, {self.vocab_size})")
        if self.policy == "stop" and not self.stop_ids:
            raise CodecError("policy 'stop' needs stop_ids (e.g. the PAD and EOS/EOSEQ ids)")
        if self.policy == "nearest" and self.width > MAX_NEAREST_WIDTH:
            raise CodecError(
                f"policy 'nearest' supports widths up to {MAX_NEAREST_WIDTH} bits (it tabulates all "
                f"2^P codes); width is {self.width}: use policy 'modulo' or 'stop'"
            )
        perm = self.permutation
        if isinstance(perm, IdCodeMap):
            if perm.vocab_size != self.vocab_size:
                raise CodecError(
                    f"id->code map covers {perm.vocab_size} ids but the vocabulary has {self.vocab_size}"
                )
            if int(perm.id_to_code.max()) >= 2**self.width:
                raise CodecError(f"id->code map uses codes >= 2^{self.width}; raise the width")
        elif perm not in (None, "gray"):
            raise CodecError(f"permutation must be None, 'gray' or an IdCodeMap, got {perm!r}")

    @property
    def headroom(self) -> int:
        """Number of invalid codes, 2^P - V."""
        return 2**self.width - self.vocab_size

    @property
    def id_dtype(self):
        return _id_dtype(self.vocab_size)

    # -- ids <-> codes -------------------------------------------------------------------
    def ids_to_codes(self, ids):
        """ids ``[...]`` -> uint32 codes (the permutation applied)."""
        xp = _xp(ids)
        ids = xp.asarray(ids)
        if isinstance(self.permutation, IdCodeMap):
            return self.permutation.encode(ids)
        if self.permutation == "gray":
            return gray_encode(ids)
        return ids.astype(xp.uint32)

    def codes_to_index(self, codes):
        """uint32 codes -> uint32 index in [0, 2^P): the id when < V, an invalid code otherwise."""
        if isinstance(self.permutation, IdCodeMap):
            return self.permutation.decode(codes)
        if self.permutation == "gray":
            return gray_decode(codes)
        return codes

    # -- ids <-> bits --------------------------------------------------------------------
    def ids_to_bits(self, ids):
        """ids ``[..., T]`` -> uint8 bits ``[..., T*P]``."""
        return codes_to_bits(self.ids_to_codes(ids), self.width)

    def ids_to_analog(self, ids):
        """ids ``[..., T]`` -> float32 bits in {0., 1.} ``[..., T*P]`` (the diffusion's clean data)."""
        xp = _xp(ids)
        return self.ids_to_bits(ids).astype(xp.float32)

    def bits_to_codes(self, bits):
        """Bits ``[..., T*P]`` (uint8/bool, or floats thresholded at 0.5) -> uint32 codes ``[..., T]``."""
        return bits_to_codes(bits, self.width)

    def decode(self, bits) -> Decoded:
        """Bits ``[..., T*P]`` -> ``Decoded(ids, n_invalid, length)`` under the codec's policy."""
        xp = _xp(bits)
        codes = self.bits_to_codes(bits)
        index = self.codes_to_index(codes)
        vocab = xp.uint32(self.vocab_size) if self.vocab_size < 2**32 else None
        invalid = index >= vocab if vocab is not None else xp.zeros(index.shape, bool)
        n_invalid = xp.sum(invalid, axis=-1, dtype=xp.int32)
        id_dtype = xp.dtype(self.id_dtype)
        num_tokens = index.shape[-1]
        if self.policy == "modulo":
            ids = (index % vocab if vocab is not None else index).astype(id_dtype)
            length = xp.full(index.shape[:-1], num_tokens, xp.int32)
        elif self.policy == "nearest":
            table = xp.asarray(_nearest_valid_index_table(self))
            ids = table[codes].astype(id_dtype)
            length = xp.full(index.shape[:-1], num_tokens, xp.int32)
        else:
            ids, length = self._decode_stop(index, invalid, xp)
        return Decoded(ids, n_invalid, length)

    def _decode_stop(self, index, invalid, xp):
        """OWT rule: cut at the first stop id, drop invalid codes, left-align what is kept."""
        num_tokens = index.shape[-1]
        positions = xp.arange(num_tokens, dtype=xp.int32)
        is_stop = xp.zeros(index.shape, bool)
        for stop_id in self.stop_ids:  # a handful of ids, unrolled at trace time
            is_stop = is_stop | (index == xp.uint32(stop_id))
        first_stop = xp.min(xp.where(is_stop, positions, num_tokens), axis=-1, keepdims=True)
        keep = (positions < first_stop) & ~invalid
        # Stable sort on "not kept" moves kept ids to the front in their original order.
        order = xp.argsort(~keep, axis=-1, stable=True)
        fill = self.pad_id if self.pad_id is not None else 0
        length = xp.sum(keep, axis=-1, dtype=xp.int32)
        kept = xp.take_along_axis(xp.where(keep, index, xp.uint32(fill)), order, axis=-1)
        kept = xp.where(positions < length[..., None], kept, xp.uint32(fill))
        return kept.astype(xp.dtype(self.id_dtype)), length


@functools.lru_cache(maxsize=8)
def _nearest_valid_index_table(codec: BitCodec) -> np.ndarray:
    """[2^P] int64: for every code (not index), the id whose code is nearest in Hamming distance.

    Multi-source breadth-first search over the P-cube from all valid codes. Ties go to the
    neighbour reached by flipping the least significant bit, so the table is deterministic.
    """
    num_codes = 2**codec.width
    all_codes = np.arange(num_codes, dtype=np.uint32)
    index = np.asarray(codec.codes_to_index(all_codes)).astype(np.int64)
    table = np.where(index < codec.vocab_size, index, -1)
    while (table < 0).any():  # one pass per Hamming distance, at most P passes
        previous = table.copy()
        for bit in range(codec.width):
            reached = previous[all_codes ^ np.uint32(1 << bit)]
            take = (table < 0) & (reached >= 0)
            table[take] = reached[take]
    return table
