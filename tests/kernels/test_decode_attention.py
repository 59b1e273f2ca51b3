"""decode_attention against an fp64 Python reference, on every path: those this CPU has, natively, and the AVX-512
one also in the emulated build (emulated.py) on any CPU. Caches with packed and dense tokens, GQA groups of 1 to 9,
one token, contexts not a multiple of any block, padding masks, splits over threads, fp32 dense tokens."""

import math

import pytest
import torch
from emulated import emulated_ops  # tests/kernels/emulated.py

from sparamx.kernels import cpu_paths, ops
from sparamx.pipeline.kv_sparsity import kept_elements, prune_pack, unpack

PATHS = cpu_paths.available_isas() + ("emulated avx512",)
# (batch, KV heads, group, head_dim, packed tokens (whole K tiles of 16), dense tokens, K sparsity, V sparsity)
CASES = [
    (1, 3, 3, 64, 0, 1, 0.0, 0.0),  # one token
    (1, 3, 3, 64, 0, 77, 0.0, 0.0),  # dense only
    (2, 3, 3, 64, 96, 37, 0.5, 0.5),
    (1, 2, 4, 128, 1008, 130, 0.7, 0.3),  # several ranges per head, an odd tile at a block's end
    (3, 2, 1, 32, 32, 1, 0.9, 0.0),
    (1, 1, 2, 64, 16, 0, 0.5, 0.5),  # packed only, one tile
    (2, 1, 3, 64, 592, 0, 0.3, 0.9),
    (1, 1, 9, 64, 64, 10, 0.5, 0.5),  # a group wider than one register pass of heads
    (1, 1, 1, 256, 48, 3, 0.5, 0.5),  # the widest head the AVX-512 path takes
]


def op_for(isa):
    if isa.startswith("emulated "):
        return emulated_ops().decode_attention.default, isa.removeprefix("emulated ")
    return torch.ops.sparamx.decode_attention.default, isa


def make_cache(b, h, d, packed, tail, k_sparsity, v_sparsity, tail_dtype=torch.bfloat16, slack=3, seed=0):
    """(k, v) as (values, masks, tail) buffers with `slack` spare tokens each, and the dense K, V they hold."""
    gen = torch.Generator().manual_seed(seed)
    streams, dense = [], []
    for sparsity, tile in ((k_sparsity, ops.kv_tile()), (v_sparsity, None)):
        x = (torch.randn(b, h, packed + tail, d, generator=gen) * 2).to(tail_dtype)
        keep = kept_elements(d, sparsity) if sparsity else d
        values, masks = prune_pack(x[:, :, :packed], keep, tile)
        vb = torch.zeros(b, h, packed + slack, keep, dtype=torch.bfloat16)
        mb = torch.zeros(b, h, packed + slack, d // 8, dtype=torch.uint8)
        tb = torch.zeros(b, h, tail + slack, d, dtype=tail_dtype)
        vb[:, :, :packed], mb[:, :, :packed], tb[:, :, :tail] = values, masks, x[:, :, packed:]
        streams.append((vb, mb, tb))
        dense.append(torch.cat([unpack(values.bfloat16(), masks, tile).to(tail_dtype), x[:, :, packed:]], 2))
    return streams, dense


def reference(q, k, v, valid, scale):
    g = q.shape[1] // k.shape[1]
    kr, vr = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = torch.einsum("bhd,bhtd->bht", q.double(), kr) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), vr)


def check(out, ref, q):
    assert out.shape == q.shape and out.dtype == q.dtype
    slack = 2.0**-8 * ref.abs() + 1e-2 if q.dtype == torch.bfloat16 else 1e-5
    assert ((out.double() - ref).abs() <= slack).all(), (out.double() - ref).abs().max()


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("b, h, g, d, packed, tail, ks, vs", CASES)
def test_matches_reference(isa, b, h, g, d, packed, tail, ks, vs):
    op, isa_arg = op_for(isa)
    (k, v), (kd, vd) = make_cache(b, h, d, packed, tail, ks, vs, seed=packed + tail)
    gen = torch.Generator().manual_seed(1)
    valid = torch.rand(b, packed + tail, generator=gen) < 0.7
    valid[:, -1] = True
    for dtype, mask in ((torch.float32, None), (torch.bfloat16, valid), (torch.float32, valid)):
        q = torch.randn(b, h * g, d, generator=gen).to(dtype)
        out = op(q, *k, *v, packed, tail, mask, d**-0.5, isa_arg)
        check(out, reference(q, kd, vd, mask, d**-0.5), q)


@pytest.mark.parametrize("isa", PATHS)
def test_fp32_dense_tokens_and_exact_buffers(isa):
    """An fp32 model's dense tokens are read as they are; buffers without a spare token are never read past."""
    op, isa_arg = op_for(isa)
    (k, v), (kd, vd) = make_cache(2, 3, 64, 48, 19, 0.5, 0.7, tail_dtype=torch.float32, slack=0)
    q = torch.randn(2, 9, 64)
    check(op(q, *k, *v, 48, 19, None, 0.125, isa_arg), reference(q, kd, vd, None, 0.125), q)


@pytest.mark.parametrize("isa", PATHS)
def test_a_row_with_every_token_masked_but_one_range(isa):
    """Split ranges where no token is attended add nothing (left padding longer than a range)."""
    op, isa_arg = op_for(isa)
    (k, v), (kd, vd) = make_cache(2, 1, 64, 896, 44, 0.5, 0.5)
    valid = torch.ones(2, 940, dtype=torch.bool)
    valid[0, :800] = False
    q = torch.randn(2, 3, 64)
    check(op(q, *k, *v, 896, 44, valid, 0.125, isa_arg), reference(q, kd, vd, valid, 0.125), q)


def test_head_dim_not_a_multiple_of_32_runs_below_avx512():
    (k, v), (kd, vd) = make_cache(1, 2, 40, 16, 5, 0.5, 0.5)
    q = torch.randn(1, 4, 40)
    op = torch.ops.sparamx.decode_attention.default
    check(op(q, *k, *v, 16, 5, None, 0.2, "auto"), reference(q, kd, vd, None, 0.2), q)
    if "avx512" in cpu_paths.available_isas():
        with pytest.raises(RuntimeError, match="head_dim % 32"):
            op(q, *k, *v, 16, 5, None, 0.2, "avx512")


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("stream", ["k", "v"])
def test_a_mask_that_disagrees_with_keep_is_refused(isa, stream):
    op, isa_arg = op_for(isa)
    (k, v), _ = make_cache(1, 1, 64, 32, 2, 0.5, 0.5)
    (k if stream == "k" else v)[1][0, 0, 19, 0] ^= 1  # a bit more or less than K's second tile, or V's token 19, keeps
    with pytest.raises(RuntimeError, match="exactly as many set bits"):
        op(torch.randn(1, 2, 64), *k, *v, 32, 2, None, 0.125, isa_arg)


def test_bad_shapes_are_named():
    (k, v), _ = make_cache(1, 2, 64, 16, 2, 0.5, 0.5)
    op = torch.ops.sparamx.decode_attention.default
    with pytest.raises(RuntimeError, match="not a multiple of 2 KV heads"):
        op(torch.randn(1, 3, 64), *k, *v, 16, 2, None, 0.125)
    with pytest.raises(RuntimeError, match="do not fit"):
        op(torch.randn(1, 4, 64), *k, *v, 16, 6, None, 0.125)
    with pytest.raises(RuntimeError, match="valid must be bool"):
        op(torch.randn(1, 4, 64), *k, *v, 16, 2, torch.ones(1, 11, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="tiles of 16 tokens; 10 packed"):
        op(torch.randn(1, 4, 64), *k, *v, 10, 2, None, 0.125)
    with pytest.raises(RuntimeError, match="holds no tokens"):
        op(torch.randn(1, 4, 64), *k, *v, 0, 0, None, 0.125)


def test_opcheck():
    (k, v), _ = make_cache(2, 3, 64, 48, 9, 0.5, 0.5)
    valid = torch.ones(2, 57, dtype=torch.bool)
    torch.library.opcheck(
        torch.ops.sparamx.decode_attention.default, (torch.randn(2, 9, 64), *k, *v, 48, 9, valid, 0.125, "auto")
    )
