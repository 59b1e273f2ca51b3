// y = x @ W^T (+ bias) with W in the canonical bitmap format (bf16 values), for decode-sized M.
// AVX-512 path: for each 32 columns, `vpexpandw` expand-loads the row's next popcount(mask) values straight into a
// register (zeros where the bitmask is clear) and `vdpbf16ps` accumulates 32 products into 16 fp32 lanes; the loop
// takes two such chunks (64 columns) per step.
// Reference path: unpack to dense and matmul in fp32 on bf16-rounded x. Both give y in x's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "cpu_features.h"

namespace sparamx {

at::Tensor bitmap_unpack(const at::Tensor& compressed, const at::Tensor& bitmask, const at::Tensor& row_offsets,
                         int64_t in_features);

namespace {

struct Problem {
  const uint16_t* x;  // bf16 [M, K]
  int64_t M, K, N, nbytes;
  const uint8_t* bitmask;
  const uint16_t* values;
  int64_t nnz;
  const int64_t* offsets;
  const float* bias;  // nullable, fp32 [N]
  float* y;           // fp32 [M, N]
};

// ---- ISA-specific code: only here, after every include, so no inline function of a header is compiled for
// AVX-512 and then picked by the linker for a machine without it.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16")

inline uint32_t chunk_bits(const uint8_t* row, int64_t byte, int64_t nbytes) {
  uint32_t bits = 0;
  std::memcpy(&bits, row + byte, static_cast<size_t>(std::min<int64_t>(4, nbytes - byte)));
  return bits;
}

inline int64_t row_popcount(const uint8_t* row, int64_t nbytes) {
  int64_t count = 0, k = 0;
  for (; k + 8 <= nbytes; k += 8) {
    uint64_t word;
    std::memcpy(&word, row + k, 8);
    count += __builtin_popcountll(word);
  }
  for (; k < nbytes; ++k) count += __builtin_popcount(row[k]);
  return count;
}

// Rows [n0, n1) for x rows [m0, m0 + MB). Each row's popcount is checked against row_offsets before its values
// are read, so inconsistent tensors return false instead of reading out of bounds. The loop takes 64 columns per
// step (one 64-bit mask, two expand-loads) into two accumulators per x row, so consecutive vdpbf16ps do not wait on
// each other.
template <int MB>
bool rows_avx512(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K64 = p.K & ~int64_t(63);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* bits = p.bitmask + n * p.nbytes;
    const int64_t begin = p.offsets[n];
    const int64_t end = n + 1 < p.N ? p.offsets[n + 1] : p.nnz;
    if (begin < 0 || end > p.nnz || end - begin != row_popcount(bits, p.nbytes)) return false;
    const uint16_t* v = p.values + begin;
    __m512 acc0[MB], acc1[MB];
    for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K64; k += 64) {
      uint64_t mask;
      std::memcpy(&mask, bits + (k >> 3), 8);
      if (!mask) continue;
      const uint32_t lo = static_cast<uint32_t>(mask), hi = static_cast<uint32_t>(mask >> 32);
      const __m512bh w0 = (__m512bh)_mm512_maskz_expandloadu_epi16(lo, v);
      v += __builtin_popcount(lo);
      const __m512bh w1 = (__m512bh)_mm512_maskz_expandloadu_epi16(hi, v);
      v += __builtin_popcount(hi);
      for (int i = 0; i < MB; ++i) {
        const uint16_t* xr = p.x + (m0 + i) * p.K + k;
        acc0[i] = _mm512_dpbf16_ps(acc0[i], w0, (__m512bh)_mm512_loadu_si512(xr));
        acc1[i] = _mm512_dpbf16_ps(acc1[i], w1, (__m512bh)_mm512_loadu_si512(xr + 32));
      }
    }
    for (int64_t k = K64; k < p.K; k += 32) {  // tail: fewer than 64 columns left
      const int64_t left = p.K - k;
      const uint32_t valid = left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1);
      const uint32_t mask = chunk_bits(bits, k >> 3, p.nbytes) & valid;
      if (!mask) continue;
      const __m512bh w = (__m512bh)_mm512_maskz_expandloadu_epi16(mask, v);
      v += __builtin_popcount(mask);
      for (int i = 0; i < MB; ++i) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(valid, p.x + (m0 + i) * p.K + k);
        acc0[i] = _mm512_dpbf16_ps(acc0[i], w, xv);
      }
    }
    const float b = p.bias ? p.bias[n] : 0.0f;
    for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i])) + b;
  }
  return true;
}

#pragma GCC pop_options
// ---- end of ISA-specific code

bool rows_dispatch(const Problem& p, int64_t n0, int64_t n1) {
  bool ok = true;
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) ok &= rows_avx512<4>(p, m, n0, n1);
  switch (p.M - m) {
    case 3: ok &= rows_avx512<3>(p, m, n0, n1); break;
    case 2: ok &= rows_avx512<2>(p, m, n0, n1); break;
    case 1: ok &= rows_avx512<1>(p, m, n0, n1); break;
    default: break;
  }
  return ok;
}

// Row ranges holding equal shares of the nonzeros, so threads finish together whatever the per-row sparsity.
std::vector<int64_t> split_by_nnz(const int64_t* offsets, int64_t N, int64_t nnz, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, N);
  bounds[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    const int64_t target = nnz * t / parts;
    bounds[t] = std::max(bounds[t - 1], std::lower_bound(offsets, offsets + N, target) - offsets);
  }
  return bounds;
}

at::Tensor linear_avx512(const at::Tensor& x2d, const at::Tensor& compressed, const at::Tensor& bitmask,
                         const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias) {
  const at::Tensor xb = x2d.to(at::kBFloat16).contiguous();
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t N = bitmask.size(0);
  at::Tensor y = at::empty({xb.size(0), N}, xb.options().dtype(at::kFloat));
  Problem p{reinterpret_cast<const uint16_t*>(xb.const_data_ptr()), xb.size(0), xb.size(1), N, bitmask.size(1),
            bitmask.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(compressed.const_data_ptr()),
            compressed.numel(), row_offsets.const_data_ptr<int64_t>(),
            bias32.defined() ? bias32.const_data_ptr<float>() : nullptr, y.data_ptr<float>()};
  if (p.M == 0 || N == 0) return y;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  const std::vector<int64_t> bounds = split_by_nnz(p.offsets, N, p.nnz, parts);
  std::atomic<bool> ok{true};
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!rows_dispatch(p, bounds[t], bounds[t + 1])) ok = false;
    }
  });
  TORCH_CHECK(ok.load(), "bitmap_linear: the bitmask popcounts disagree with row_offsets / compressed");
  return y;
}

}  // namespace

at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& compressed, const at::Tensor& bitmask,
                         const at::Tensor& row_offsets, int64_t in_features, const std::optional<at::Tensor>& bias,
                         c10::string_view isa) {
  TORCH_CHECK(x.device().is_cpu(), "bitmap_linear: expected CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "bitmap_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "bitmap_linear: x must be [..., ", in_features,
              "], got shape ", x.sizes());
  TORCH_CHECK(compressed.scalar_type() == at::kBFloat16 && compressed.dim() == 1 && compressed.is_contiguous(),
              "bitmap_linear: compressed must be a contiguous 1-D bfloat16 tensor");
  const int64_t nbytes = (in_features + 7) / 8;
  TORCH_CHECK(bitmask.scalar_type() == at::kByte && bitmask.dim() == 2 && bitmask.size(1) == nbytes &&
                  bitmask.is_contiguous(),
              "bitmap_linear: bitmask must be contiguous uint8 [out, ", nbytes, "], got ", bitmask.sizes());
  const int64_t N = bitmask.size(0);
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 1 && row_offsets.size(0) == N &&
                  row_offsets.is_contiguous(),
              "bitmap_linear: row_offsets must be contiguous int64 [", N, "]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bitmap_linear: bias must be [", N, "], got ",
                bias->sizes());
  }
  const bool avx512 = has_avx512_bitmap_kernels();
  TORCH_CHECK(isa == "auto" || isa == "reference" || isa == "avx512",
              "bitmap_linear: isa must be auto, reference or avx512, got ", std::string(isa));
  TORCH_CHECK(isa != "avx512" || avx512, "bitmap_linear: isa=avx512 forced but this CPU lacks AVX-512 "
              "F/BW/VL/VBMI2/BF16");

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const at::Tensor x2d = x.reshape({-1, in_features});
  at::Tensor y;
  if (isa == "reference" || !avx512) {
    const at::Tensor w = bitmap_unpack(compressed, bitmask, row_offsets, in_features).to(at::kFloat);
    // Same numbers as the kernel: activations rounded to bf16, products summed in fp32.
    y = at::matmul(x2d.to(at::kBFloat16).to(at::kFloat), w.t());
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
  } else {
    y = linear_avx512(x2d, compressed, bitmask, row_offsets, bias);
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) { m.impl("bitmap_linear", &bitmap_linear); }

}  // namespace sparamx
