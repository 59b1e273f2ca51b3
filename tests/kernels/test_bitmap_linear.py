import pytest
import torch

from sparamx.kernels import ops

ISAS = ops.available_isas()
SHAPES = [(576, 576), (33, 7), (1000, 17), (31, 4), (64, 9), (100, 50), (1, 3), (4096, 5)]  # (K, N)
SPARSITIES = [0.0, 0.3, 0.5, 0.9, 1.0]
MS = [1, 2, 3, 16, 17, 64, 300]


def bitmap_weight(n, k, sparsity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < sparsity] = 0
    return w.bfloat16()


def check(y, x, w, bias):
    """Against an fp64 matmul of the same bf16 operands: only summation order may differ (and y's rounding)."""
    xb = x.bfloat16().double()
    ref = xb @ w.double().T + (bias.double() if bias is not None else 0)
    scale = xb.abs() @ w.double().abs().T + 1e-30
    slack = 2e-6 * scale + (2.0**-8 * ref.abs() if y.dtype == torch.bfloat16 else 0)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert ((y.double() - ref).abs() <= slack + 1e-6).all()
    # And against the plain fp32 reference of the issue: within the bf16 rounding of the activations.
    fp32 = torch.nn.functional.linear(x.float(), w.float(), bias)
    assert (
        (y.double() - fp32.double()).abs() <= 2.0**-8 * (x.double().abs() @ w.double().abs().T) + slack + 1e-5
    ).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_matches_reference_on_awkward_shapes(isa, k, n, sparsity, monkeypatch):
    monkeypatch.setenv("SPARAMX_ISA", isa)
    w = bitmap_weight(n, k, sparsity)
    packed = ops.bitmap_pack(w)
    for m, dtype, with_bias in [(1, torch.bfloat16, False), (3, torch.float32, True), (17, torch.bfloat16, True)]:
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n) if with_bias else None
        check(ops.bitmap_linear(x, *packed, k, bias), x, w, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
def test_every_decode_and_batch_size(isa, m, monkeypatch):
    monkeypatch.setenv("SPARAMX_ISA", isa)
    w = bitmap_weight(50, 200, 0.5, seed=m)
    x = torch.randn(m, 200)
    check(ops.bitmap_linear(x, *ops.bitmap_pack(w), 200, None), x, w, None)


def test_leading_dims_and_empty_batch():
    w = bitmap_weight(8, 40, 0.5)
    packed = ops.bitmap_pack(w)
    x = torch.randn(2, 3, 40)
    y = ops.bitmap_linear(x, *packed, 40)
    assert y.shape == (2, 3, 8)
    assert torch.allclose(y, ops.bitmap_linear(x.reshape(6, 40), *packed, 40).reshape(2, 3, 8))
    assert ops.bitmap_linear(torch.randn(0, 40), *packed, 40).shape == (0, 8)


def test_paths_agree_and_threads_do_not_change_the_result():
    w = bitmap_weight(301, 777, 0.6)
    packed = ops.bitmap_pack(w)
    x = torch.randn(4, 777)
    ys = {isa: torch.ops.sparamx.bitmap_linear.default(x, *packed, 777, None, isa) for isa in ISAS}
    assert torch.allclose(ys["reference"], ys[ISAS[-1]], rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.bitmap_linear(x, *packed, 777)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, ops.bitmap_linear(x, *packed, 777))


def test_opcheck():
    w = bitmap_weight(9, 37, 0.5)
    args = (torch.randn(3, 37), *ops.bitmap_pack(w), 37, torch.randn(9), ops.isa())
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.sparamx.bitmap_linear.default, args, test_utils=utils)


@pytest.mark.parametrize("isa", ISAS)
def test_inconsistent_bitmap_is_an_error_not_a_crash(isa):
    w = bitmap_weight(6, 70, 0.5)
    compressed, bitmask, row_offsets = ops.bitmap_pack(w)
    bad = bitmask.clone()
    bad[2, 0] ^= 0xFF  # row 2 now claims a different number of values than row_offsets says
    with pytest.raises(RuntimeError, match="row_offsets|popcount|compressed"):
        torch.ops.sparamx.bitmap_linear.default(torch.randn(1, 70), compressed, bad, row_offsets, 70, None, isa)
    short = compressed[: compressed.numel() // 2].clone()
    with pytest.raises(RuntimeError, match="row_offsets|popcount|compressed"):
        torch.ops.sparamx.bitmap_linear.default(torch.randn(1, 70), short, bitmask, row_offsets, 70, None, isa)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(1, 69)), "x must be \\[..., 70\\]"),
        (dict(x=torch.ones(1, 70, dtype=torch.int32)), "x must be float32 or bfloat16"),
        (dict(compressed=lambda c: c.float()), "compressed must be a contiguous 1-D bfloat16"),
        (dict(bias=torch.randn(5)), "bias must be \\[6\\]"),
        (dict(row_offsets=lambda r: r[:-1]), "row_offsets must be contiguous int64 \\[6\\]"),
        (dict(isa="amx512"), "isa must be auto, reference or avx512"),
    ],
)
def test_bad_arguments_are_named(change, message):
    compressed, bitmask, row_offsets = ops.bitmap_pack(bitmap_weight(6, 70, 0.5))
    args = dict(
        x=torch.randn(1, 70),
        compressed=compressed,
        bitmask=bitmask,
        row_offsets=row_offsets,
        in_features=70,
        bias=None,
        isa="auto",
    )
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sparamx.bitmap_linear.default(*args.values())


def test_isa_selection(monkeypatch):
    monkeypatch.delenv("SPARAMX_ISA", raising=False)
    assert ops.isa() == ops.available_isas()[-1]
    monkeypatch.setenv("SPARAMX_ISA", "reference")
    assert ops.isa() == "reference"
    monkeypatch.setenv("SPARAMX_ISA", "sse2")
    with pytest.raises(ValueError, match="SPARAMX_ISA='sse2'"):
        ops.isa()
    assert "avx512f" in ops.cpu_features() or ops.available_isas() == ("reference",)
