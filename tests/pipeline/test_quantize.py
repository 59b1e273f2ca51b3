import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparamx.pipeline.artifact import storage_kind
from sparamx.pipeline.quantize import dequantize, quantize_per_channel, sqnr_db


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 70), seed=st.integers(0, 2**16), spread=st.floats(1e-3, 1e3))
def test_per_channel_int8_is_symmetric_unclipped_and_within_half_a_step(rows, cols, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * spread
    w[torch.rand(rows, cols, generator=gen) < 0.5] = 0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (rows,)
    assert int(q.abs().max()) <= 127 and bool((q[w == 0] == 0).all())
    nonzero_rows = w.abs().amax(1) > 0
    # The largest weight of each row maps to +-127: the whole int8 range is used, nothing is clipped.
    assert bool((q.abs().amax(1)[nonzero_rows] == 127).all())
    error = (dequantize(q, scale) - w).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30).all())


def test_zero_row_non_finite_and_shape_errors():
    q, scale = quantize_per_channel(torch.zeros(2, 5))
    assert bool((q == 0).all()) and torch.equal(scale, torch.ones(2))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_per_channel(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_channel(torch.ones(3))


def test_sqnr():
    x = torch.randn(1000)
    assert sqnr_db(x, x) == math.inf
    assert abs(sqnr_db(x, x * 1.01) - 40.0) < 1e-3  # noise is 1% of the signal: 40 dB


def test_storage_kind_is_whichever_is_fewer_bytes():
    assert storage_kind(64, 4096, 64 * 4096 // 2, "bfloat16") == "bitmap"
    assert storage_kind(64, 4096, int(64 * 4096 * 0.95), "bfloat16") == "dense"  # a bitmap of 5% zeros costs more
    assert storage_kind(64, 4096, int(64 * 4096 * 0.9), "bfloat16") == "bitmap"
    assert storage_kind(64, 4096, int(64 * 4096 * 0.9), "int8") == "dense"  # 1 bit of mask is 1/8 of an int8
    assert storage_kind(64, 4096, int(64 * 4096 * 0.8), "int8") == "bitmap"


def test_row_blocks_give_the_same_result(monkeypatch):
    from sparamx.pipeline import quantize

    w = torch.randn(10, 33, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    whole = quantize_per_channel(w)
    monkeypatch.setattr(quantize, "_ROWS_PER_BLOCK", 3)  # blocks of 3, 3, 3 and a tail of 1
    blocked = quantize_per_channel(w)
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])
    w[9, 0] = float("inf")  # in the tail block
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_per_channel(w)
