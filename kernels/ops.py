"""One-line wrappers over the `sparamx` torch ops, their fake (meta) implementations, and the ISA choice."""

import functools
import os
import platform
from pathlib import Path

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the TORCH_LIBRARY(sparamx) registrations)


def bitmap_pack(dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense [out, in] -> (compressed values, bitmask uint8 [out, ceil(in/8)], row_offsets int64 [out])."""
    return torch.ops.sparamx.bitmap_pack.default(dense)


def bitmap_unpack(compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int) -> Tensor:
    """Canonical bitmap tensors -> dense [out, in_features] of compressed's dtype."""
    return torch.ops.sparamx.bitmap_unpack.default(compressed, bitmask, row_offsets, in_features)


def bitmap_check(compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int) -> None:
    """Raise RuntimeError unless the tensors form a consistent bitmap (popcounts vs row_offsets vs values)."""
    torch.ops.sparamx.bitmap_check.default(compressed, bitmask, row_offsets, in_features)


def bitmap_prepack(
    compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Canonical bitmap tensors -> (values, masks, block_offsets, row_sums), the kernels' load-time layout."""
    return torch.ops.sparamx.bitmap_prepack.default(compressed, bitmask, row_offsets, in_features)


def dense_prepack(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Dense bf16 or int8 [out, in] -> (blocked values, row_sums), the kernels' load-time layout."""
    return torch.ops.sparamx.dense_prepack.default(weight)


def bitmap_linear(
    x: Tensor,
    packed: tuple[Tensor, Tensor, Tensor, Tensor],
    out_features: int,
    in_features: int,
    weight_scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ W^T (+ bias), W given by bitmap_prepack's tensors (bf16, or int8 with weight_scale); y has x's dtype."""
    return torch.ops.sparamx.bitmap_linear.default(x, *packed, out_features, in_features, weight_scale, bias, isa())


def dense_linear(
    x: Tensor,
    packed: tuple[Tensor, Tensor],
    out_features: int,
    in_features: int,
    weight_scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ W^T (+ bias), W given by dense_prepack's tensors (bf16, or int8 with weight_scale)."""
    return torch.ops.sparamx.dense_linear.default(x, *packed, out_features, in_features, weight_scale, bias, isa())


@functools.cache
def packed_layout() -> tuple[int, int, int]:
    """(output rows per block, bf16 columns per chunk, int8 columns per chunk) of the prepacked layout
    (csrc/packed_format.h), asked of the library so the fake kernels below never hold a copy."""
    rows, bf16, int8 = torch.ops.sparamx.packed_layout.default()
    return rows, bf16, int8


def _blocks_and_chunks(rows: int, cols: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(blocks, chunks, chunk width) of a [rows, cols] weight of `dtype` in the prepacked layout."""
    per_block, bf16, int8 = packed_layout()
    chunk = int8 if dtype == torch.int8 else bf16
    return -(-rows // per_block), -(-cols // chunk), chunk


@functools.cache
def cpu_model() -> str:
    """The CPU's model line, as lscpu prints it ("Model name")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@functools.cache
def cpu_features() -> tuple[str, ...]:
    """What the CPU and OS allow of what our kernels use, detected once per process (cpuid, xgetbv, arch_prctl for
    AMX tile data)."""
    return tuple(torch.ops.sparamx.cpu_features.default())


@functools.cache
def kernel_paths() -> tuple[str, ...]:
    """Every kernel path the library has, worst to best: reference, avx2, avx512, amx."""
    return tuple(torch.ops.sparamx.kernel_paths.default())


@functools.cache
def amx_min_rows() -> int:
    """From how many rows of x isa=auto runs the AMX tiles, where the CPU has them."""
    return torch.ops.sparamx.amx_min_rows.default()


@functools.cache
def path_needs(path: str) -> frozenset[str]:
    """The CPU features kernel path `path` needs."""
    return frozenset(torch.ops.sparamx.kernel_path_needs.default(path))


@functools.cache
def available_isas() -> tuple[str, ...]:
    """The kernel paths this CPU can run, worst to best."""
    return tuple(name for name in kernel_paths() if path_needs(name) <= set(cpu_features()))


def missing_features(path: str) -> str:
    """The CPU features kernel path `path` needs and this process lacks, comma-separated ("" when none)."""
    return ", ".join(sorted(path_needs(path) - set(cpu_features())))


def isa() -> str:
    """What the ops are asked for: $SPARAMX_ISA when set (reference | avx2 | avx512 | amx: that path at every M), else
    "auto" (AMX tiles from amx_min_rows() rows of x where the CPU has AMX, else the best of AVX-512, AVX2, reference).
    """
    forced = os.environ.get("SPARAMX_ISA", "").strip().lower()
    if not forced or forced == "auto":
        return "auto"
    if forced not in kernel_paths():
        raise ValueError(f"SPARAMX_ISA={forced!r}: expected one of auto, {', '.join(kernel_paths())}")
    if forced not in available_isas():
        raise RuntimeError(f"SPARAMX_ISA={forced} but this CPU lacks {missing_features(forced)}")
    return forced


def kernels_preferred() -> bool:
    """Whether sparamx.load should put packed linears on our kernels by default: where the CPU runs a SIMD path
    (AVX2 or better), or SPARAMX_ISA forces a path. Elsewhere the C++ reference path would rebuild every dense weight
    on every call, slower than torch on the unpacked weights."""
    return isa() != "auto" or available_isas()[-1] != "reference"


def describe_isa() -> str:
    """One line: the path each size of x takes, e.g. "amx from 8 rows of x, avx512 below"."""
    chosen = isa()
    if chosen != "auto":
        return f"{chosen} (forced by SPARAMX_ISA)"
    best = available_isas()
    if best[-1] == "amx":
        return f"amx from {amx_min_rows()} rows of x, {best[-2]} below"
    return best[-1]


@torch.library.register_fake("sparamx::bitmap_linear")
def _(x, values, masks, block_offsets, row_sums, out_features, in_features, weight_scale=None, bias=None, isa="auto"):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("sparamx::dense_linear")
def _(x, values, row_sums, out_features, in_features, weight_scale=None, bias=None, isa="auto"):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("sparamx::bitmap_prepack")
def _(compressed, bitmask, row_offsets, in_features):
    per_block = packed_layout()[0]
    blocks, chunks, chunk = _blocks_and_chunks(bitmask.shape[0], in_features, compressed.dtype)
    return (
        compressed.new_empty((compressed.shape[0] + chunk,)),
        bitmask.new_empty((blocks, chunks, per_block * chunk // 8)),
        row_offsets.new_empty((blocks + 1,)),
        row_offsets.new_empty((blocks * per_block if compressed.dtype == torch.int8 else 0,), dtype=torch.int32),
    )


@torch.library.register_fake("sparamx::dense_prepack")
def _(weight):
    per_block = packed_layout()[0]
    blocks, chunks, chunk = _blocks_and_chunks(weight.shape[0], weight.shape[1], weight.dtype)
    return (
        weight.new_empty((blocks, chunks, per_block, chunk)),
        weight.new_empty((blocks * per_block if weight.dtype == torch.int8 else 0,), dtype=torch.int32),
    )


@torch.library.register_fake("sparamx::bitmap_pack")
def _(dense):
    rows, cols = dense.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (
        dense.new_empty(nnz),
        dense.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8),
        dense.new_empty((rows,), dtype=torch.int64),
    )


@torch.library.register_fake("sparamx::bitmap_unpack")
def _(compressed, bitmask, row_offsets, in_features):
    return compressed.new_empty((bitmask.shape[0], in_features))
