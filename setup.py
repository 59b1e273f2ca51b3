"""Builds sparamx.kernels._C against the installed torch and installs the sparamx packages.

The top-level folders pipeline/, kernels/ and eval/ are mapped into the `sparamx` namespace so that no generic
top-level module (`kernels` is also a Hugging Face package that transformers probes for) lands in site-packages.
Build with `pip install --no-build-isolation .` so the extension links against the torch already installed.
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


class BuildExtensionInPlace(BuildExtension):
    """One object folder beside the sources for every build, an editable install's (which setuptools would give a
    fresh temporary folder each time) and a wheel's: ninja then compiles only what changed since any of them."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(Path(__file__).resolve().parent / "build" / "objects")


CSRC = sorted(str(p) for p in Path("kernels/csrc").glob("*.cpp"))

setup(
    name="sparamx",
    version="0.1.0",
    description="Sparse + INT8 compression of LLMs and the AVX2 / AVX-512 / AMX kernels that run them on x86-64 CPUs",
    python_requires=">=3.10",
    packages=["sparamx", "sparamx.pipeline", "sparamx.kernels", "sparamx.eval", "sparamx.recipes"],
    package_dir={
        "sparamx": "sparamx",
        "sparamx.pipeline": "pipeline",
        "sparamx.kernels": "kernels",
        "sparamx.eval": "eval",
        "sparamx.recipes": "recipes",  # found by name from any directory (pipeline/recipe.py)
    },
    # Found by name from any directory: the recipes, and the offline lm-eval tasks with the code they call.
    package_data={"sparamx.recipes": ["*.yaml"], "sparamx.eval": ["tasks/*.yaml", "tasks/*.py"]},
    ext_modules=[
        CppExtension(
            "sparamx.kernels._C",
            CSRC,
            # No contraction of a * b + c into an FMA outside the intrinsics: the int8 epilogue then rounds the same
            # on every path and in the emulated test build (tests/kernels/emulated.py), so all give the same numbers.
            # -g0: Python's own CFLAGS ask for debug info, which for torch's headers more than doubles the build time.
            extra_compile_args=["-O3", "-g0", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtensionInPlace},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    entry_points={"console_scripts": ["sparamx=sparamx.cli:main"]},
    # The llama.cpp peer of `make bench`; `make install-bench` builds it for the CPU, with AMX off.
    extras_require={"bench": ["llama-cpp-python==0.3.36"]},
)
