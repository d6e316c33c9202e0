"""bitgen.codecs: golden parity, round trips (hypothesis), invalid-code policies and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen import codecs
from bitgen.codecs import BitCodec, CodecError, IdCodeMap
from bitgen.parity import codec as codec_parity


def test_golden_codec_suite(reference_dir):
    results = list(codec_parity.checks(reference_dir))
    assert len(results) >= 10
    failed = [r.line() for r in results if not r.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize(
    "vocab, width", [(1, 1), (2, 1), (3, 2), (8192, 13), (8193, 14), (30522, 15), (50257, 16),
                     (65536, 16), (2**32, 32)]
)
def test_width_for_vocab(vocab, width):
    assert codecs.width_for_vocab(vocab) == width


def test_width_for_vocab_rejects_more_than_32_bits():
    with pytest.raises(CodecError, match="33 bits.*smaller vocabulary"):
        codecs.width_for_vocab(2**32 + 1)


def test_msb_first_token_major_by_hand():
    bits = codecs.ids_to_bits(np.array([[1, 6]]), 3)
    np.testing.assert_array_equal(bits, [[0, 0, 1, 1, 1, 0]])
    assert bits.dtype == np.uint8


@st.composite
def ids_and_width(draw):
    width = draw(st.integers(1, 32))
    shape = draw(st.tuples(st.integers(1, 3), st.integers(1, 5)))
    ids = draw(st.lists(st.integers(0, 2**width - 1), min_size=shape[0] * shape[1],
                        max_size=shape[0] * shape[1]))
    return np.array(ids, dtype=np.uint32).reshape(shape), width


@given(ids_and_width())
def test_ids_bits_round_trip_numpy(case):
    ids, width = case
    bits = codecs.ids_to_bits(ids, width)
    assert bits.shape == (ids.shape[0], ids.shape[1] * width)
    assert set(np.unique(bits)) <= {0, 1}
    np.testing.assert_array_equal(codecs.bits_to_codes(bits, width), ids)
    # Independent reference: Python's own binary formatting, MSB first.
    first = "".join(format(int(i), f"0{width}b") for i in ids[0])
    assert "".join(map(str, bits[0])) == first


@pytest.mark.parametrize("width", [5, 16, 31, 32])
def test_jit_matches_numpy_including_p32(width):
    ids = np.array([[0, 1, 2**width - 1, 2 ** (width - 1)]], dtype=np.uint32)
    want = codecs.ids_to_bits(ids, width)
    got = jax.jit(codecs.ids_to_bits, static_argnums=1)(jnp.asarray(ids), width)
    np.testing.assert_array_equal(np.asarray(got), want)
    back = jax.jit(codecs.bits_to_ids, static_argnums=1)(got, width)
    assert back.dtype == (jnp.uint32 if width == 32 else jnp.int32)
    np.testing.assert_array_equal(np.asarray(back).astype(np.uint64), ids.astype(np.uint64))


def test_analog_bits_and_float_thresholding():
    codec = BitCodec(30522)
    ids = np.array([[101, 7592, 30521]])
    analog = codec.ids_to_analog(ids)
    assert analog.dtype == np.float32 and set(np.unique(analog)) <= {0.0, 1.0}
    noisy = analog + np.where(analog > 0.5, -0.3, 0.3).astype(np.float32)  # still on the right side of 1/2
    np.testing.assert_array_equal(codec.decode(noisy).ids, ids)


@given(st.integers(0, 2**32 - 1))
def test_gray_round_trip_and_unit_distance(n):
    n_arr = np.array([n], np.uint32)
    assert codecs.gray_decode(codecs.gray_encode(n_arr))[0] == n
    if n < 2**32 - 1:
        step = codecs.gray_encode(n_arr) ^ codecs.gray_encode(n_arr + np.uint32(1))
        assert int(step[0]).bit_count() == 1


@st.composite
def code_maps(draw):
    width = draw(st.integers(1, 8))
    vocab = draw(st.integers(1, 2**width))
    codes = draw(st.permutations(list(range(2**width))))[:vocab]
    return width, vocab, np.array(codes)


@given(code_maps(), st.sampled_from(["modulo", "nearest"]))
@settings(max_examples=40, deadline=None)
def test_code_map_round_trip(case, policy):
    width, vocab, codes = case
    codec = BitCodec(vocab, width=width, policy=policy, permutation=IdCodeMap.from_array(codes))
    ids = np.arange(vocab)[None]
    bits = codec.ids_to_bits(ids)
    np.testing.assert_array_equal(codec.bits_to_codes(bits), codes[None])
    decoded = codec.decode(bits)
    np.testing.assert_array_equal(decoded.ids, ids)
    assert decoded.n_invalid[0] == 0


@given(st.integers(2, 5000))
def test_gray_codec_round_trip(vocab):
    codec = BitCodec(vocab, permutation="gray")
    ids = np.arange(vocab)[None]
    np.testing.assert_array_equal(codec.decode(codec.ids_to_bits(ids)).ids, ids)


def test_code_map_must_be_invertible():
    with pytest.raises(CodecError, match="code 3 is used twice"):
        IdCodeMap.from_array([3, 1, 3])


def test_code_map_is_hashable_by_content():
    a, b = IdCodeMap.from_array([2, 0, 1]), IdCodeMap.from_array(np.array([2, 0, 1]))
    assert a == b and hash(BitCodec(3, permutation=a)) == hash(BitCodec(3, permutation=b))


def test_modulo_policy_wraps_invalid_codes():
    codec = BitCodec(10)  # P = 4: codes 10..15 are invalid
    out = codec.decode(codecs.codes_to_bits(np.array([[3, 10, 15, 9]]), 4))
    np.testing.assert_array_equal(out.ids, [[3, 0, 5, 9]])
    assert out.n_invalid.tolist() == [2] and out.length.tolist() == [4]


def test_stop_policy_cuts_at_first_stop_and_skips_invalid():
    codec = BitCodec(10, policy="stop", pad_id=0, stop_ids=(0, 2))
    codes = np.array([[5, 12, 7, 15, 3, 2, 4, 9],
                      [2, 5, 5, 5, 5, 5, 5, 5],
                      [4, 4, 4, 4, 4, 4, 4, 11]])
    for bits in (codecs.codes_to_bits(codes, 4), jnp.asarray(codecs.codes_to_bits(codes, 4))):
        out = codec.decode(bits)
        np.testing.assert_array_equal(out.ids, [[5, 7, 3, 0, 0, 0, 0, 0],
                                                [0] * 8,
                                                [4] * 7 + [0]])
        np.testing.assert_array_equal(out.length, [3, 0, 7])
        np.testing.assert_array_equal(out.n_invalid, [2, 0, 1])


def _hamming(a, b):
    return (int(a) ^ int(b)).bit_count()


@given(code_maps())
@settings(max_examples=40, deadline=None)
def test_nearest_policy_is_a_hamming_nearest_valid_id(case):
    width, vocab, codes = case
    codec = BitCodec(vocab, width=width, policy="nearest", permutation=IdCodeMap.from_array(codes))
    all_codes = np.arange(2**width)[None]
    decoded = codec.decode(codecs.codes_to_bits(all_codes, width)).ids[0]
    for code, got in zip(all_codes[0], decoded):
        best = min(_hamming(code, c) for c in codes)
        assert 0 <= got < vocab and _hamming(code, codes[got]) == best


def test_nearest_policy_by_hand():
    codec = BitCodec(10, policy="nearest")
    # 14 = 1110: flipping bits 0..2 stays invalid, flipping bit 3 gives 0110 = 6.
    out = codec.decode(codecs.codes_to_bits(np.array([[10, 11, 14, 9]]), 4))
    np.testing.assert_array_equal(out.ids, [[8, 9, 6, 9]])


@pytest.mark.parametrize("policy", ["modulo", "stop", "nearest"])
def test_decode_under_jit_with_static_codec(policy):
    codec = BitCodec(300, policy=policy, pad_id=0, stop_ids=(1,), permutation="gray")
    codes = np.array([[5, 400, 299, 1, 7], [511, 0, 2, 3, 300]], np.uint32)
    bits = codecs.codes_to_bits(codes, codec.width)
    want = codec.decode(bits)
    got = jax.jit(lambda b, c: c.decode(b), static_argnums=1)(jnp.asarray(bits), codec)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_size": 100, "width": 5}, "cannot hold 100 ids"),
        ({"vocab_size": 100, "policy": "wrap"}, "not one of"),
        ({"vocab_size": 100, "policy": "stop"}, "needs stop_ids"),
        ({"vocab_size": 2**24, "policy": "nearest"}, "up to 20 bits"),
        ({"vocab_size": 100, "pad_id": 100}, "outside the vocabulary"),
        ({"vocab_size": 100, "permutation": "reverse"}, "permutation must be"),
        ({"vocab_size": 4, "permutation": IdCodeMap.from_array([0, 1, 2])}, "covers 3 ids"),
    ],
)
def test_codec_errors(kwargs, message):
    with pytest.raises(CodecError, match=message):
        BitCodec(**kwargs)


def test_bits_length_must_be_a_multiple_of_width():
    with pytest.raises(CodecError, match="not a multiple"):
        codecs.bits_to_codes(np.zeros((1, 7), np.uint8), 3)
