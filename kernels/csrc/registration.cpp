// The one schema block of the sparamx op library; implementations register with TORCH_LIBRARY_IMPL in their own
// files. The module init below only exists so `import sparamx.kernels._C` loads the library (pytorch/extension-cpp).
#include <Python.h>
#include <torch/library.h>

#include "cpu_features.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparamx, m) {
  // Canonical compressed-tensors sparse-bitmask format: values of nonzeros in row-major order, a little-bit-order
  // bitmask [rows, ceil(cols / 8)] and the exclusive prefix sum of nonzeros per row.
  m.def("bitmap_pack(Tensor dense) -> (Tensor compressed, Tensor bitmask, Tensor row_offsets)");
  m.def("bitmap_unpack(Tensor compressed, Tensor bitmask, Tensor row_offsets, int in_features) -> Tensor");
  // Raises unless the three tensors are a consistent bitmap of in_features columns (popcounts, offsets, tail bits).
  m.def("bitmap_check(Tensor compressed, Tensor bitmask, Tensor row_offsets, int in_features) -> ()");
  // y = x @ W^T (+ bias), W given by the canonical bitmap tensors (bf16 values). isa: auto | reference | avx512.
  m.def("bitmap_linear(Tensor x, Tensor compressed, Tensor bitmask, Tensor row_offsets, int in_features, "
        "Tensor? bias=None, str isa='auto') -> Tensor");
  // Bit set of the CPU features detected once per process (see csrc/cpu_features.h).
  m.def("cpu_features() -> int", &sparamx::cpu_features);
}
