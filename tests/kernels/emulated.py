"""The test-only build of the kernel sources against software AVX-512 (SIMDe) and AMX (a tile emulator,
kernels/csrc/emulation/): the same kernels, registered as torch.ops.sparamx_emulated, so the AVX-512 and AMX paths
are checked on any x86-64 CPU. Built once into build/emulated/ beside the checkout (ninja skips it when unchanged);
never part of the user's install."""

import functools
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
EMULATED_PATHS = ("avx512", "amx")


@functools.cache
def emulated_ops():
    """torch.ops.sparamx_emulated, building the library first if needed (about a minute on 2 cores)."""
    import simde_py
    from torch.utils import cpp_extension

    build = ROOT / "build" / "emulated"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="sparamx_emulated",
        sources=sorted(str(p) for p in (ROOT / "kernels" / "csrc").glob("*.cpp")),
        extra_cflags=[
            "-O2",
            "-fopenmp",
            "-ffp-contract=off",  # as setup.py's build
            "-DSPARAMX_EMULATED",
            "-Dsparamx=sparamx_emulated",  # its own op namespace and C++ symbols, beside the real library
            f"-I{simde_py.get_include()}",
        ],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.sparamx_emulated
