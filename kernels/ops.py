"""One-line wrappers over the `sparamx` torch ops, their fake (meta) implementations, and the ISA choice."""

import functools
import os

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


def bitmap_linear(
    x: Tensor, compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int, bias: Tensor | None = None
) -> Tensor:
    """y = x @ W^T (+ bias) with W in the canonical bitmap format (bf16 values); y has x's dtype."""
    return torch.ops.sparamx.bitmap_linear.default(x, compressed, bitmask, row_offsets, in_features, bias, isa())


FEATURES = (
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
AVX512_KERNEL_FEATURES = {"avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_bf16"}
ISAS = ("reference", "avx512")


@functools.cache
def cpu_features() -> frozenset[str]:
    """What the CPU and OS allow, detected once per process (cpuid, xgetbv, arch_prctl for AMX tile data)."""
    bits = torch.ops.sparamx.cpu_features.default()
    return frozenset(name for i, name in enumerate(FEATURES) if bits >> i & 1)


def available_isas() -> tuple[str, ...]:
    return ("reference", "avx512") if AVX512_KERNEL_FEATURES <= cpu_features() else ("reference",)


def isa() -> str:
    """The kernel path: $SPARAMX_ISA when set (reference | avx512), else the best this CPU has."""
    forced = os.environ.get("SPARAMX_ISA", "").strip().lower()
    if not forced:
        return available_isas()[-1]
    if forced not in ISAS:
        raise ValueError(f"SPARAMX_ISA={forced!r}: expected one of {', '.join(ISAS)}")
    if forced not in available_isas():
        missing = ", ".join(sorted(AVX512_KERNEL_FEATURES - cpu_features()))
        raise RuntimeError(f"SPARAMX_ISA={forced} but this CPU lacks {missing}")
    return forced


@torch.library.register_fake("sparamx::bitmap_linear")
def _(x, compressed, bitmask, row_offsets, in_features, bias=None, isa="auto"):
    return x.new_empty((*x.shape[:-1], bitmask.shape[0]))


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
