"""Bit packing: exact round trips, the documented LSB-first layout, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.packing import pack, packed_row_bytes, unpack, unpack_into

BITS = list(range(1, 9))
PROPERTY = settings(max_examples=60, deadline=None)


def ref_pack_row(codes: list[int], bits: int) -> list[int]:
    """Pure-Python reference: code i at bits [i*bits, (i+1)*bits) of an LSB-first stream."""
    stream = [0] * (len(codes) * bits)
    for i, code in enumerate(codes):
        for b in range(bits):
            stream[i * bits + b] = (code >> b) & 1
    out = []
    for start in range(0, len(stream), 8):
        chunk = stream[start : start + 8]
        out.append(sum(bit << j for j, bit in enumerate(chunk)))
    return out


def ref_unpack_row(data: list[int], bits: int, n: int) -> list[int]:
    """Pure-Python reference decoder of the same stream."""
    stream = [(byte >> j) & 1 for byte in data for j in range(8)]
    return [sum(stream[i * bits + b] << b for b in range(bits)) for i in range(n)]


def random_codes(seed: int, shape: tuple[int, ...], bits: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=gen).to(torch.uint8)


@st.composite
def code_tensors(draw):
    bits = draw(st.integers(1, 8))
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    n = draw(st.integers(0, 67))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_codes(seed, (*lead, n), bits), bits


@PROPERTY
@given(code_tensors())
def test_round_trip_is_exact(case):
    codes, bits = case
    n = codes.shape[-1]
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (*codes.shape[:-1], (n * bits + 7) // 8)
    restored = unpack(packed, bits, n)
    assert restored.dtype == torch.uint8
    assert restored.shape == codes.shape
    assert torch.equal(restored, codes)


@PROPERTY
@given(bits=st.integers(1, 8), n=st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
def test_layout_matches_reference_bit_stream(bits, n, seed):
    codes = random_codes(seed, (2, n), bits)
    packed = pack(codes, bits)
    for row in range(2):
        expected = ref_pack_row(codes[row].tolist(), bits)
        assert packed[row].tolist() == expected


@PROPERTY
@given(bits=st.integers(1, 8), n=st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
def test_unpack_matches_reference_decoder(bits, n, seed):
    # Arbitrary bytes (padding bits set too): unpack must read exactly the documented positions.
    nbytes = (n * bits + 7) // 8
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (3, nbytes), generator=gen).to(torch.uint8)
    codes = unpack(data, bits, n)
    for row in range(3):
        assert codes[row].tolist() == ref_unpack_row(data[row].tolist(), bits, n)


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        ([1, 2, 3], 2, [0b00111001]),
        ([5, 3], 3, [0b00011101]),
        ([7, 7, 7], 3, [0xFF, 0x01]),
        ([1, 0, 1, 1, 0, 0, 0, 1, 1], 1, [0b10001101, 0b1]),
        ([0xA, 0x5, 0xF], 4, [0x5A, 0x0F]),
        ([31, 1], 5, [0x3F, 0x00]),
        ([200, 7], 8, [200, 7]),
    ],
)
def test_hand_computed_bytes(codes, bits, expected):
    packed = pack(torch.tensor(codes, dtype=torch.uint8), bits)
    assert packed.tolist() == expected
    assert packed.tolist() == ref_pack_row(codes, bits)
    assert unpack(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", BITS)
def test_unused_bits_of_last_byte_are_zero(bits):
    codes = torch.full((4, 5), (1 << bits) - 1, dtype=torch.uint8)
    packed = pack(codes, bits)
    used = (5 * bits) % 8
    if used:
        assert torch.all(packed[:, -1] >> used == 0)
    assert packed.shape[-1] == packed_row_bytes(5, bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 7), (2, 0, 5)])
def test_empty_tensors(bits, shape):
    codes = torch.zeros(shape, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert tuple(packed.shape) == (*shape[:-1], packed_row_bytes(shape[-1], bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", BITS)
def test_non_contiguous_inputs_match_contiguous_copy(bits):
    base = random_codes(bits, (24, 40), bits)
    views = [base.t(), base[:, ::3], base[1::2, 5:37], base.t()[::2]]
    for view in views:
        assert not view.is_contiguous()
        assert torch.equal(pack(view, bits), pack(view.contiguous(), bits))
    packed = pack(base, bits)
    wide = torch.zeros(24, packed.shape[1] + 3, dtype=torch.uint8)
    wide[:, 1 : 1 + packed.shape[1]] = packed
    sliced = wide[:, 1 : 1 + packed.shape[1]]
    assert not sliced.is_contiguous()
    assert torch.equal(unpack(sliced, bits, 40), base)
    transposed = packed.t().contiguous().t()
    assert torch.equal(unpack(transposed, bits, 40), base)


def test_packed_row_bytes():
    assert packed_row_bytes(0, 4) == 0
    assert packed_row_bytes(1, 1) == 1
    assert packed_row_bytes(8, 1) == 1
    assert packed_row_bytes(9, 1) == 2
    assert packed_row_bytes(3, 3) == 2
    assert packed_row_bytes(8, 3) == 3
    assert packed_row_bytes(64, 4) == 32
    assert packed_row_bytes(7, 8) == 7


@pytest.mark.parametrize("bits", [0, 9, -1, 16, True, 2.0, "4", None])
def test_bad_bits(bits):
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack(codes, bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(codes, bits, 8)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.int32, torch.float32])
def test_codes_must_be_uint8(dtype):
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(2, 8, dtype=dtype), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(2, 4, dtype=dtype), 4, 8)


def test_float_codes_with_nan_or_inf_are_rejected():
    for value in (float("nan"), float("inf")):
        with pytest.raises(TypeError):
            pack(torch.full((2, 8), value), 4)


@pytest.mark.parametrize("n", [-1, True, 2.5, None])
def test_unpack_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        unpack(torch.zeros(2, 4, dtype=torch.uint8), 4, n)


@pytest.mark.parametrize(("bits", "n", "nbytes"), [(4, 8, 3), (4, 8, 5), (3, 8, 4), (8, 4, 3)])
def test_unpack_wrong_byte_count(bits, n, nbytes):
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(2, nbytes, dtype=torch.uint8), bits, n)


@PROPERTY
@given(
    bits=st.integers(1, 8),
    rows=st.integers(0, 5),
    n=st.integers(0, 67),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int32]),
)
def test_unpack_into_equals_unpack(bits, rows, n, seed, dtype):
    codes = random_codes(seed, (rows, n), bits)
    out = torch.full((rows, n), -1, dtype=dtype)
    result = unpack_into(pack(codes, bits), bits, out)
    assert result is out
    assert torch.equal(out, codes.to(dtype))
