"""The four linear formats (bitmap / dense x bf16 / int8) against Python references, on every kernel path: those
this CPU has, natively, and the AVX-512 and AMX ones also in the emulated build (emulated.py) on any CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from emulated import EMULATED_PATHS, emulated_ops  # tests/kernels/emulated.py

from sparamx.kernels import cpu_paths, ops
from sparamx.kernels.modules import DenseLinear, SparseLinear

ISAS = cpu_paths.available_isas()
# Every path the grids run: the native ones, then "emulated <path>" (the same kernel sources in software).
PATHS = ISAS + tuple(f"emulated {path}" for path in EMULATED_PATHS)
FORMATS = ("bitmap bf16", "bitmap int8", "dense bf16", "dense int8")
SHAPES = [(576, 576), (33, 7), (1000, 17), (31, 4), (64, 9), (100, 50), (1, 3), (4096, 5), (129, 1)]  # (K, N)
SPARSITIES = [0.0, 0.3, 0.5, 0.9, 1.0]
MS = [1, 2, 3, 16, 17, 64, 300]
PREFILL_ROWS = 150  # past every path's prefill threshold (kernels/csrc/linear.cpp: kGemmRows, kInt8GemmRows)


def random_weight(n, k, sparsity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < sparsity] = 0
    return w


def quantize_rows(w):
    """Per-output-channel symmetric int8, scale = absmax / 127 (a zero row gets scale 1)."""
    scale = w.abs().amax(dim=1) / 127
    scale[scale == 0] = 1
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_activations(x, symmetric=False):
    """What the int8 kernels do to x, per row: asymmetric uint8 with an exact zero, or (x_symmetric) int8 at scale
    max|x| / 127.5 shifted by 128; rounding half to even."""
    x = x.float()
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    scale = torch.maximum(-lo, hi) / 127.5 if symmetric else (hi - lo) / 255
    scale[scale == 0] = 1
    zero = torch.full_like(scale, 128) if symmetric else torch.round(-lo / scale).clamp(0, 255)
    return (torch.round(x / scale[:, None]) + zero[:, None]).clamp(0, 255), scale, zero


class Case:
    """One weight in one format: its packed tensors, the op that runs them, and the Python reference."""

    def __init__(self, fmt, w, bias=None, x_symmetric=False):
        self.fmt, self.n, self.k, self.bias, self.x_symmetric = fmt, *w.shape, bias, x_symmetric
        self.int8 = fmt.endswith("int8")
        if self.int8:
            self.weight, self.scale = quantize_rows(w)
        else:
            self.weight, self.scale = w.bfloat16(), None
        if fmt.startswith("bitmap"):
            self.packed = ops.bitmap_prepack(*ops.bitmap_pack(self.weight), self.k)
            self.name = "bitmap_linear"
        else:
            self.packed = ops.dense_prepack(self.weight)
            self.name = "dense_linear"
        self.op = getattr(torch.ops.sparamx, self.name).default

    def op_for(self, isa):
        """(op, isa argument) for a native path, "emulated <path>", or None: what cpu_paths.isa() asks for."""
        if isa and isa.startswith("emulated "):
            return getattr(emulated_ops(), self.name).default, isa.removeprefix("emulated ")
        return self.op, isa or cpu_paths.isa()

    def run(self, x, isa=None):
        op, isa = self.op_for(isa)
        return op(x, *self.packed, self.n, self.k, self.scale, self.bias, isa, self.x_symmetric)

    def check(self, x, y):
        x2 = x.reshape(-1, self.k)
        bias = self.bias.double() if self.bias is not None else 0
        if self.int8:  # exact integer dot products, then the kernel's fp32 epilogue: equal up to fp32 rounding
            q, sx, z = quantize_activations(x2, self.x_symmetric)
            w = self.weight.double()
            dots = (q.double() @ w.T - z.double()[:, None] * w.sum(1)[None, :]).float()
            ref = ((sx[:, None] * self.scale[None, :]) * dots).double() + bias
            magnitude = q.double() @ w.abs().T + 255 * w.abs().sum(1)
            slack = 1e-6 * (sx[:, None] * self.scale[None, :]).double() * magnitude
        else:  # fp64 matmul of the same bf16 operands: only the summation order may differ
            xb, w = x2.bfloat16().double(), self.weight.double()
            ref = xb @ w.T + bias
            slack = 2e-6 * (xb.abs() @ w.abs().T)
        if y.dtype == torch.bfloat16:
            slack = slack + 2.0**-8 * ref.abs()
        assert y.shape == (*x.shape[:-1], self.n) and y.dtype == x.dtype
        assert ((y.reshape(-1, self.n).double() - ref).abs() <= slack + 1e-6).all()


# Dense formats do not look at sparsity: two levels suffice for them.
FORMAT_SPARSITY = [(f, s) for f in FORMATS for s in (SPARSITIES if f.startswith("bitmap") else (0.0, 0.5))]


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("fmt, sparsity", FORMAT_SPARSITY)
@pytest.mark.parametrize("k, n", SHAPES)
def test_matches_reference_on_awkward_shapes(isa, fmt, sparsity, k, n):
    w = random_weight(n, k, sparsity, seed=k * 31 + n)
    for m, dtype, with_bias in [(1, torch.bfloat16, False), (3, torch.float32, True), (17, torch.bfloat16, True)]:
        case = Case(fmt, w, torch.randn(n) if with_bias else None)
        x = torch.randn(m, k).to(dtype)
        case.check(x, case.run(x, isa))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", MS)
def test_every_decode_and_batch_size(isa, fmt, m):
    case = Case(fmt, random_weight(50, 200, 0.5, seed=m))
    x = torch.randn(m, 200) * 3
    case.check(x, case.run(x, isa))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("fmt", ("bitmap int8", "dense int8"))
@pytest.mark.parametrize("k, n", [(576, 576), (33, 7), (1000, 17)])
def test_symmetric_activations_match_reference(isa, fmt, k, n):
    """x_symmetric (compressed-tensors' int8 activations): the same kernels with scale max|x| / 127.5 and the zero
    point fixed at 128, decode rows to prefill, one row all zeros and one whose extremes round to 0 and 255."""
    case = Case(fmt, random_weight(n, k, 0.5, seed=k + n), torch.randn(n), x_symmetric=True)
    for m, dtype in [(1, torch.bfloat16), (3, torch.float32), (17, torch.bfloat16), (300, torch.float32)]:
        x = torch.randn(m, k).to(dtype)
        x[0] = 0
        if m > 1:
            x[1, :2] = torch.tensor([-4.0, 4.0])
        case.check(x, case.run(x, isa))
    assert not torch.equal(case.run(x, isa), Case(fmt, random_weight(n, k, 0.5, seed=k + n), case.bias).run(x, isa))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("fmt", ("bitmap int8", "dense int8"))
def test_int8_extremes_never_saturate(isa, fmt):
    """Weights at +-127 against activations the quantizer maps to 0 and 255: every pair of products is 2 * 255 * 127,
    past int16 (where vpmaddubsw would saturate), and whole rows sum to 255 * 127 * K."""
    k = 4099
    signs = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
    w = torch.stack([signs, -signs, torch.ones(k), -torch.ones(k), signs * (torch.arange(k) % 2)]) * 127
    case = Case(fmt, w)
    assert case.weight.abs().max() == 127 and torch.equal(case.scale, torch.ones(5))
    x = torch.stack([signs * 10, torch.full((k,), 3.0), -signs * 10])
    y = case.run(x, isa)
    case.check(x, y)
    q, sx, z = quantize_activations(x)
    assert q.min() == 0 and q.max() == 255
    assert y[1, 2] == pytest.approx(sx[1].item() * 255 * 127 * k, rel=1e-6)  # 255 * 127 * 4099 ~ 1.3e8 in int32
    # As many rows as prefill: the AVX-512 path's int8 GEMM (cpu_paths.int8_gemm_rows) gives each row bit for bit.
    rows = x.repeat(PREFILL_ROWS // 3 + 1, 1)[:PREFILL_ROWS]
    assert torch.equal(case.run(rows, isa)[:3], y)


INT8_GEMM_OFF = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_linear import PREFILL_ROWS, Case, random_weight
from sparamx.kernels import cpu_paths
assert cpu_paths.int8_gemm_rows() == 0, cpu_paths.int8_gemm_rows()  # the probe saw torch's int8 GEMM saturate
for fmt in ("bitmap int8", "dense int8"):
    case = Case(fmt, random_weight(70, 300, 0.5), torch.randn(70))
    x = torch.randn(PREFILL_ROWS, 300) * 4
    y = case.run(x, "avx512")
    case.check(x, y)
    assert torch.equal(y[:2], case.run(x[:2], "avx512"))
print("ok")
"""


@pytest.mark.skipif("avx512" not in ISAS, reason="the AVX-512 path is what multiplies int8 weights by torch's GEMM")
def test_int8_prefill_falls_back_to_the_kernel_where_torch_int8_gemm_saturates():
    """oneDNN held below VNNI (ONEDNN_MAX_CPU_ISA=AVX2) adds u8 x s8 pairs in saturating int16: the probe must turn
    the int8 GEMM off, and prefill rows run on the kernel, exact. With oneDNN free, the GEMM is on (and exact: the
    grids above run it from PREFILL_ROWS rows on)."""
    assert cpu_paths.int8_gemm_rows() > 0
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    script = INT8_GEMM_OFF.format(tests=str(Path(__file__).parent))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.parametrize("fmt", FORMATS)
def test_leading_dims_empty_batch_and_threads(fmt):
    case = Case(fmt, random_weight(301, 777, 0.6), torch.randn(301))
    x = torch.randn(2, 3, 777)
    y = case.run(x)
    case.check(x, y)
    assert torch.equal(y.reshape(6, 301), case.run(x.reshape(6, 777)))
    assert case.run(torch.randn(0, 777)).shape == (0, 301)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = case.run(x)
    finally:
        torch.set_num_threads(threads)
    if cpu_paths.available_isas()[-1] == "reference":  # torch's GEMM: its reduction order may change with the threads
        torch.testing.assert_close(single, y, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(single, y)  # our kernels: each output is summed by one thread in a fixed order


@pytest.mark.parametrize("fmt", FORMATS)
def test_paths_agree(fmt):
    case = Case(fmt, random_weight(37, 333, 0.5))
    x = torch.randn(5, 333)
    ys = [case.run(x, isa) for isa in PATHS]
    for y in ys[1:]:
        assert torch.allclose(ys[0], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    case = Case(fmt, random_weight(9, 70, 0.5), torch.randn(9))
    args = (torch.randn(3, 70), *case.packed, 9, 70, case.scale, case.bias, cpu_paths.isa())
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(case.op, args, test_utils=utils)
    w = case.weight
    if fmt.startswith("bitmap"):
        torch.library.opcheck(torch.ops.sparamx.bitmap_prepack.default, (*ops.bitmap_pack(w), 70), test_utils=utils)
    else:
        torch.library.opcheck(torch.ops.sparamx.dense_prepack.default, (w,), test_utils=utils)


def test_prepack_preserves_the_weight():
    """Prepacked bitmap -> dense (the reference path's reconstruction) is the original weight, for both dtypes."""
    for fmt in ("bitmap bf16", "bitmap int8"):
        for k, n in [(33, 7), (64, 9), (129, 5)]:
            case = Case(fmt, random_weight(n, k, 0.5))
            eye = torch.eye(k)
            y = case.run(eye, "reference")  # column j of W^T is W[:, j] (scaled for int8)
            expected = case.weight.float() * (case.scale[:, None] if case.int8 else 1)
            if case.int8:
                assert torch.allclose(y.T, expected, rtol=1e-2, atol=2 * case.scale.max().item())
            else:
                assert torch.equal(y.T, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ("bitmap bf16", "bitmap int8"))
def test_inconsistent_masks_are_an_error_not_a_crash(path, fmt):
    case = Case(fmt, random_weight(6, 130, 0.5))
    op, isa = case.op_for(path)
    values, masks, offsets, sums = case.packed
    bad = masks.clone()
    bad[0, 0, 0] ^= 0xFF  # block 0 now claims a different number of values than block_offsets says
    with pytest.raises(RuntimeError, match="popcounts disagree"):
        op(torch.randn(1, 130), values, bad, offsets, sums, 6, 130, case.scale, None, isa)
    full = torch.full_like(masks, 0xFF)  # every bit set: asks for far more values than exist
    for m in (2, 200):  # the decode kernel, and the unpack-then-GEMM path of prefill-sized inputs
        with pytest.raises(RuntimeError, match="popcounts disagree"):
            op(torch.randn(m, 130), values, full, offsets, sums, 6, 130, case.scale, None, isa)
    with pytest.raises(RuntimeError, match="block_offsets must run from 0"):
        op(torch.randn(1, 130), values[:-3].clone(), masks, offsets, sums, 6, 130, case.scale, None, isa)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(1, 69)), "x must be \\[..., 70\\]"),
        (dict(x=torch.ones(1, 70, dtype=torch.int32)), "x must be float32 or bfloat16"),
        (dict(values=lambda v: v.float()), "values must be bfloat16 or int8"),
        (dict(bias=torch.randn(5)), "bias must be \\[6\\]"),
        (dict(masks=lambda m: m[:1]), "masks must be contiguous uint8 \\[2, 3, 16\\]"),
        (dict(block_offsets=lambda b: b[:-1]), "block_offsets must be contiguous int64 \\[3\\]"),
        (dict(weight_scale=torch.ones(6)), "weight_scale is only for int8"),
        (dict(out_features=9), "masks must be contiguous uint8"),  # 3 blocks of 4 rows, not 2
        (dict(isa="amx512"), "isa must be auto, reference, avx2, avx512 or amx"),
    ],
)
def test_bad_arguments_are_named(change, message):
    case = Case("bitmap bf16", random_weight(6, 70, 0.5))
    args = dict(zip(("values", "masks", "block_offsets", "row_sums"), case.packed, strict=True))
    args = dict(x=torch.randn(1, 70), **args, out_features=6, in_features=70, weight_scale=None, bias=None, isa="auto")
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sparamx.bitmap_linear.default(*args.values())


def test_int8_needs_its_scale_and_rejects_non_finite_activations():
    case = Case("dense int8", random_weight(6, 70, 0.0))
    with pytest.raises(RuntimeError, match="weight_scale with 6 elements"):
        case.op(torch.randn(1, 70), *case.packed, 6, 70, None, None, "auto")
    x = torch.randn(2, 70)
    x[1, 5] = float("nan")
    with pytest.raises(RuntimeError, match="inf or nan"):
        case.run(x)


def test_modules_match_the_ops_and_nn_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(130, 20)
    with torch.no_grad():
        linear.weight[torch.rand(20, 130) < 0.5] = 0
    x = torch.randn(4, 130)
    for module in (SparseLinear.from_linear(linear), DenseLinear.from_linear(linear)):
        assert torch.allclose(module(x), linear(x), rtol=2e-2, atol=3e-2)  # bf16 weights and activations
        assert "weights=bf16" in repr(module)
    q, scale = quantize_rows(linear.weight.detach())
    int8 = DenseLinear(q, linear.bias.detach(), scale)
    assert int8.int8 and torch.allclose(int8(x), linear(x), rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="weight_scale of 20"):
        DenseLinear(q, None, None)


def test_isa_selection(monkeypatch):
    monkeypatch.delenv("SPARAMX_ISA", raising=False)
    assert cpu_paths.isa() == "auto"
    assert cpu_paths.describe_isa().startswith(cpu_paths.available_isas()[-1])
    monkeypatch.setenv("SPARAMX_ISA", "reference")
    assert cpu_paths.isa() == "reference"
    monkeypatch.setenv("SPARAMX_ISA", "sse2")
    with pytest.raises(ValueError, match="SPARAMX_ISA='sse2'"):
        cpu_paths.isa()
    for name in cpu_paths.kernel_paths():
        monkeypatch.setenv("SPARAMX_ISA", name)
        if name in cpu_paths.available_isas():
            assert cpu_paths.isa() == name
        else:
            with pytest.raises(RuntimeError, match=f"SPARAMX_ISA={name} but this CPU lacks"):
                cpu_paths.isa()
            x = torch.randn(1, 70)
            case = Case("bitmap bf16", random_weight(6, 70, 0.5))
            with pytest.raises(RuntimeError, match=f"isa={name} forced but this CPU .* lacks"):
                case.run(x, name)


def test_our_cpu_detection_agrees_with_torch():
    """Our cpuid (needed in C++, and finer: VBMI2, BF16, tile permission) never contradicts what torch detects."""
    capability = torch.backends.cpu.get_cpu_capability()  # DEFAULT | AVX2 | AVX512; ATEN_CPU_CAPABILITY only lowers it
    if capability in ("AVX2", "AVX512"):
        assert "avx2" in cpu_paths.available_isas()
    if capability == "AVX512":
        assert {"avx512f", "avx512bw", "avx512vl"} <= set(cpu_paths.cpu_features())
    if "amx_tile" in cpu_paths.cpu_features():
        assert torch.cpu._is_amx_tile_supported()
    assert cpu_paths.describe_isa() == cpu_paths.available_isas()[-1] or cpu_paths.describe_isa().startswith("amx from")


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_picks_a_path_that_agrees_with_each_forced_one(fmt):
    """isa=auto switches path with the rows of x (AMX tiles from amx_min_rows() where present): every size of x gives
    what the forced paths give, and int8 gives the same numbers on AVX-512 and AMX (exact integer dot products)."""
    case = Case(fmt, random_weight(45, 300, 0.5, seed=3), torch.randn(45))
    for m in (1, cpu_paths.amx_min_rows() - 1, cpu_paths.amx_min_rows(), 16, 70, 257):
        x = torch.randn(m, 300)
        y = case.run(x, "auto")
        case.check(x, y)
        for forced in PATHS:
            other = case.run(x, forced)
            case.check(x, other)
            if case.int8 and forced != "reference":  # exact integer dot products on every SIMD path
                assert torch.equal(y, other), (m, forced)
