import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparamx.pipeline.artifact_format import BITMAP_FROM, storage_kind
from sparamx.pipeline.quantize import dequantize, gptq_per_channel, quantize_per_channel, sqnr_db


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


def test_storage_kind_is_bitmap_where_it_is_smaller_and_runs_faster():
    assert storage_kind(64, 4096, 64 * 4096 // 2, "bfloat16") == "bitmap"
    assert storage_kind(64, 4096, int(64 * 4096 * 0.95), "bfloat16") == "dense"  # a bitmap of 5% zeros costs more
    # 10% zeros: fewer bytes as a bitmap, but the dense kernel streams faster than the bitmap one saves
    assert storage_kind(64, 4096, int(64 * 4096 * 0.9), "bfloat16") == "dense"
    for dtype, sparsity in BITMAP_FROM.items():
        assert storage_kind(64, 4096, round(64 * 4096 * (1 - sparsity)), dtype) == "bitmap"
        assert storage_kind(64, 4096, round(64 * 4096 * (1 - sparsity)) + 1, dtype) == "dense"
    assert storage_kind(64, 4, 2 * 64, "int8") == "dense"  # 4 columns: the row offsets outweigh the zeros


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


def correlated_inputs(tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs whose columns are correlated and of unequal energy, as a linear's inputs in an LLM are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    return (torch.randn(tokens, cols, generator=gen) @ mix) * torch.rand(cols, generator=gen).add(0.1) * 3


@pytest.mark.parametrize(
    ("rows", "cols", "sparsity", "gain"),
    # at 90% sparsity only a tenth of each row is left to take the rounding errors: a smaller gain
    [(7, 200, 0.5, 0.8), (16, 64, 0.0, 0.8), (5, 33, 0.3, 0.8), (4, 300, 0.9, 0.95), (3, 130, 1.0, None)],
)
def test_gptq_keeps_the_grid_and_the_mask_and_beats_rounding_on_the_calibration_inputs(rows, cols, sparsity, gain):
    """Same scales and zeros as round-to-nearest; every value on the int8 grid; less output error on the inputs it
    was calibrated on (block 128 with a tail where cols is not a multiple of it)."""
    gen = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=gen)
    w[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    x = correlated_inputs(4 * cols, cols, rows)
    q, scale = gptq_per_channel(w, x.T @ x)
    q_rtn, scale_rtn = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and torch.equal(scale, scale_rtn)
    assert int(q.abs().max()) <= 127 and bool((q[w == 0] == 0).all())
    if sparsity == 1.0:
        assert bool((q == 0).all())
        return
    error = (x @ (dequantize(q, scale) - w).T).square().sum()
    error_rtn = (x @ (dequantize(q_rtn, scale_rtn) - w).T).square().sum()
    assert error < gain * error_rtn


def test_gptq_rejects_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="2-D"):
        gptq_per_channel(torch.ones(3), torch.eye(3))
    with pytest.raises(ValueError, match="inf or nan"):
        gptq_per_channel(torch.tensor([[1.0, float("inf")]]), torch.eye(2))
    with pytest.raises(ValueError, match="gram must have shape"):
        gptq_per_channel(torch.ones(2, 3), torch.eye(2))
