import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparamx.kernels import ops
from sparamx.pipeline.bitmap import pack_reference, unpack_reference

SHAPES = [(1, 1), (3, 7), (5, 8), (2, 9), (16, 33), (64, 576), (7, 1000), (0, 5), (4, 0)]
SPARSITIES = [0.0, 0.3, 0.5, 0.9, 1.0]
DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.int8]


def sparse_tensor(shape, sparsity, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        dense = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    else:
        dense = torch.randn(shape, generator=gen).to(dtype)
    keep = torch.rand(shape, generator=gen) >= sparsity
    return torch.where(keep, dense, torch.zeros((), dtype=dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_matches_reference_and_round_trips(shape, sparsity, dtype):
    dense = sparse_tensor(shape, sparsity, dtype)
    compressed, bitmask, row_offsets = ops.bitmap_pack(dense)
    ref = pack_reference(dense)
    assert compressed.dtype == dtype and bitmask.dtype == torch.uint8 and row_offsets.dtype == torch.int64
    assert torch.equal(compressed, ref[0]) and torch.equal(bitmask, ref[1]) and torch.equal(row_offsets, ref[2])
    assert torch.equal(ops.bitmap_unpack(compressed, bitmask, row_offsets, shape[1]), dense)
    assert torch.equal(unpack_reference(compressed, bitmask, row_offsets, shape[1]), dense)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 24), cols=st.integers(0, 80), sparsity=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_round_trip_is_bit_exact(rows, cols, sparsity, seed):
    dense = sparse_tensor((rows, cols), sparsity, torch.bfloat16, seed)
    packed = ops.bitmap_pack(dense)
    out = ops.bitmap_unpack(*packed, cols)
    assert torch.equal(out.view(torch.int16), dense.view(torch.int16))  # bit-exact, not just equal values


def test_negative_zero_is_not_stored():
    dense = torch.tensor([[0.0, -0.0, 1.0]], dtype=torch.bfloat16)
    compressed, bitmask, _ = ops.bitmap_pack(dense)
    assert compressed.tolist() == [1.0] and bitmask.tolist() == [[0b100]]


def test_non_contiguous_input_is_packed_by_value():
    dense = sparse_tensor((12, 10), 0.5, torch.float32).t()
    assert torch.equal(ops.bitmap_unpack(*ops.bitmap_pack(dense), 12), dense)


def test_opcheck():
    dense = sparse_tensor((9, 37), 0.5, torch.bfloat16)
    packed = ops.bitmap_pack(dense)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.sparamx.bitmap_unpack.default, (*packed, 37), test_utils=utils)
    torch.library.opcheck(torch.ops.sparamx.bitmap_pack.default, (dense,), test_utils=utils)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda c, b, r: (c, b, r + 1, 21), "row_offsets\\[0\\]"),
        (lambda c, b, r: (c[:-1], b, r, 21), "set bits but compressed holds"),
        (lambda c, b, r: (torch.cat([c, c[:1]]), b, r, 21), "set bits but compressed holds"),
        (lambda c, b, r: (c, b, r, 20), "bits set past in_features=20"),
        (lambda c, b, r: (c, b, r, 40), "bitmask must be \\[rows, 5\\]"),
        (lambda c, b, r: (c, b.to(torch.int8), r, 21), "bitmask must be uint8"),
        (lambda c, b, r: (c, b, r.to(torch.int32), 21), "row_offsets must be int64"),
        (lambda c, b, r: (c, b, r[:-1], 21), "row_offsets must be \\[6\\]"),
        (lambda c, b, r: (c.view(1, -1), b, r, 21), "compressed must be 1-D"),
        (lambda c, b, r: (c, b, r, -1), "in_features must be >= 0"),
    ],
)
def test_unpack_rejects_inconsistent_input(corrupt, message):
    dense = sparse_tensor((6, 21), 0.0, torch.bfloat16)
    dense[:, 20] = 1.0  # bit 20 set in every row, so in_features=20 leaves bits past the end
    args = corrupt(*ops.bitmap_pack(dense))
    with pytest.raises(RuntimeError, match=message):
        ops.bitmap_unpack(*args)


def test_pack_rejects_wrong_rank():
    with pytest.raises(RuntimeError, match="expected a 2-D weight"):
        ops.bitmap_pack(torch.ones(2, 3, 4))
