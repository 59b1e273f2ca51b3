// The one schema block of the sparamx op library; implementations register with TORCH_LIBRARY_IMPL in their own
// files. The module init below only exists so `import sparamx.kernels._C` loads the library (pytorch/extension-cpp).
#include <Python.h>
#include <torch/library.h>

#include "attention_kernels.h"
#include "cpu_features.h"
#include "linear_kernels.h"
#include "packed_format.h"

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
  // Canonical tensors -> the kernels' blocked layout (packed_format.h), derived at load time, never stored:
  // (values, masks, block_offsets, row_sums). Validates the canonical tensors first. values: bf16 or int8.
  m.def("bitmap_prepack(Tensor compressed, Tensor bitmask, Tensor row_offsets, int in_features) -> "
        "(Tensor values, Tensor masks, Tensor block_offsets, Tensor row_sums)");
  m.def("dense_prepack(Tensor weight) -> (Tensor values, Tensor row_sums)");
  // y = x @ W^T (+ bias) on prepacked weights; y has x's dtype. int8 weights need weight_scale [out] (w = scale * q)
  // and quantize x per row to uint8 on the fly: asymmetric, or symmetric with x_symmetric (compressed-tensors' int8
  // activations). isa: auto | reference | avx2 | avx512 | amx.
  m.def("bitmap_linear(Tensor x, Tensor values, Tensor masks, Tensor block_offsets, Tensor row_sums, "
        "int out_features, int in_features, Tensor? weight_scale=None, Tensor? bias=None, str isa='auto', "
        "bool x_symmetric=False) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor values, Tensor row_sums, int out_features, int in_features, "
        "Tensor? weight_scale=None, Tensor? bias=None, str isa='auto', bool x_symmetric=False) -> Tensor");
  // Attention of one query token per sequence over a layer's KV cache (attention_kernels.h): q [B, Hq, head_dim];
  // per K and V the first `packed` tokens pruned per token (values [B, H, cap, keep] bf16 + masks [B, H, cap,
  // head_dim / 8]), then `tail` dense tokens [B, H, cap_tail, head_dim] bf16 or fp32; valid [B, packed + tail] bool
  // marks the tokens attended (None: all). Returns [B, Hq, head_dim] in q's dtype. isa: as the linear ops'.
  m.def("decode_attention(Tensor q, Tensor k_values, Tensor k_masks, Tensor k_tail, Tensor v_values, Tensor v_masks, "
        "Tensor v_tail, int packed, int tail, Tensor? valid, float scale, str isa='auto') -> Tensor");
  // One Llama decoder layer for one new token per sequence (decode_layer.cpp): hidden [B, hidden] in the model's
  // dtype (float32 or bfloat16), cos / sin [B, head_dim] of the token's position; weights: the two norms, then per
  // linear (values, masks or None, block_offsets or None, row_sums, weight_scale, bias) for q/k/v (1 or 3 linears),
  // o, gate/up (1 or 2), down; shapes: [n_qkv, n_gate_up, then (out, in, x_symmetric) per linear]; heads: [Hq, Hkv,
  // head_dim].
  // Writes the token's K (rotated) and V at position `tail` of k_tail / v_tail, attends over packed + tail + 1 tokens
  // as decode_attention does, and returns the layer's output hidden state.
  m.def("decode_layer(Tensor hidden, Tensor cos, Tensor sin, Tensor?[] weights, int[] shapes, int[] heads, "
        "float eps, Tensor k_values, Tensor k_masks, Tensor(a!) k_tail, Tensor v_values, Tensor v_masks, "
        "Tensor(b!) v_tail, int packed, int tail, Tensor? valid, float scale, str isa='auto') -> Tensor");
  // What the CPU can run, detected once per process, and what each kernel path needs (csrc/cpu_features.h).
  m.def("cpu_features() -> str[]", &sparamx::cpu_feature_names);
  m.def("kernel_paths() -> str[]", &sparamx::kernel_paths);
  m.def("kernel_path_needs(str path) -> str[]", &sparamx::kernel_path_needs);
  // (output rows per block, bf16 columns per chunk, int8 columns per chunk) of the prepacked layout, for the fakes.
  m.def("packed_layout() -> int[]", []() -> std::vector<int64_t> {
    return {sparamx::kRows, sparamx::chunk_width(at::kBFloat16), sparamx::chunk_width(at::kChar)};
  });
  // Tokens per packed K tile of the KV cache (attention_kernels.h), for the packer in pipeline/kv_sparsity.py.
  m.def("kv_tile() -> int", []() -> int64_t { return sparamx::kKTile; });
  // From how many rows of x isa=auto runs the AMX tiles (where the CPU has them).
  m.def("amx_min_rows() -> int", &sparamx::amx_min_rows);
  // From how many rows of x the AVX-512 path multiplies int8 weights by torch's int8 GEMM; 0 where that GEMM is not
  // exact in this process (then the kernel runs at every M).
  m.def("int8_gemm_rows() -> int", &sparamx::int8_gemm_rows);
}
