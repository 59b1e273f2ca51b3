"""The CPU and its kernel paths: what this CPU runs (asked once of the library: cpuid, xgetbv, arch_prctl), and which
path the linear ops are asked for. The path tables themselves live in C++ (csrc/cpu_features.cpp)."""

import functools
import os
import platform
from pathlib import Path

import torch

from . import _C  # noqa: F401  (loads the TORCH_LIBRARY(sparamx) registrations)


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
def int8_gemm_rows() -> int:
    """From how many rows of x the AVX-512 path runs int8 weights on torch's int8 GEMM; 0 where that GEMM does not
    give exact integer dot products in this process (oneDNN held below VNNI), and the kernel runs at every M."""
    return torch.ops.sparamx.int8_gemm_rows.default()


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
