// y = x @ W^T (+ bias) for prepacked weights (packed_format.h): bitmap or dense, bf16 or int8. This file checks the
// arguments, quantizes x for int8 weights, picks the kernel path, lays x out for it and splits the work over threads;
// the paths themselves are in linear_avx512.cpp, linear_avx2.cpp and linear_amx.cpp.
// int8: weights per output channel symmetric (w = scale * q); activations quantized per row on the fly, asymmetric
// to uint8 (x = sx * (q - z), zero exact), so y = sx * sw * (sum q_x q_w - z * sum q_w): every path computes the
// integer dot products exactly, so all give the same numbers.
// isa=auto: AMX tiles from kAmxRows activation rows on where the CPU has them, else AVX-512, else AVX2, else the
// reference path; a forced isa runs that path at every M. From kGemmRows activation rows on (prefill), outside AMX,
// bf16 weights are unpacked slab by slab and multiplied by torch's fp32 GEMM instead, and from kInt8GemmRows on the
// AVX-512 path's int8 weights by torch's int8 GEMM. Reference path: the dense
// weight rebuilt and multiplied in fp32 (bf16) or exactly in fp64 (int8): the same numbers up to summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "linear_kernels.h"
#include "op_functions.h"
#include "packed_format.h"

namespace sparamx {

at::Tensor prepacked_to_dense(const at::Tensor& values, const at::Tensor& masks, const at::Tensor& block_offsets,
                              int64_t N, int64_t K);

namespace {

// From this many activation rows on (prefill), bf16 weights are unpacked slab by slab and multiplied by torch's
// fp32 GEMM (the same numbers: bf16 products are exact in fp32): the expand-load kernel has no register blocking over
// M. Measured side by side (Llama-3-8B shapes, 50%): at M = 16 the kernel runs 1.4-1.7x torch bf16 where fp32 GEMM
// runs 0.9x; at M = 64 the GEMM path runs 1.13-1.17x where the kernel ran 0.88-1.16x (down_proj the slowest).
constexpr int64_t kGemmRows = 64;
// From this many activation rows on (prefill), int8 weights on the AVX-512 path are unpacked slab by slab to dense
// int8 and multiplied by torch's int8 GEMM (at::_int_mm, oneDNN's VNNI kernels): the same exact integer dot products
// as the kernel, so the same numbers. Measured side by side on 2 cores (AVX-512 Zen 4), whole op: SmolLM2's shapes
// 1.3-1.8x the kernel at M = 1024 (the GEMM alone 3-4x; quantizing x, shared by both, is most of the rest);
// Llama-3-8B's (4096x4096, 14336x4096, bitmap 50%) 0.9-1.3x at M = 128 and 1.1-1.35x at M = 256. At M = 64 the
// GEMM alone beat the kernel by only 1.06-1.2x before unpacking: the dense int8 weight is twice the bitmap's bytes.
constexpr int64_t kInt8GemmRows = 128;
// From this many activation rows on, where the CPU has AMX, isa=auto runs the tile path (linear_amx.cpp). Measured
// side by side on a 16-core Xeon with AMX (4096x4096 and 14336x4096, bitmap 50% and dense, 2 and 16 threads, weights
// in cache): at M = 4 the AVX-512 kernel won 10 of 12 cases; at M = 8 the tiles ran 1.5-2.2x it for bf16 and
// 0.94-1.5x for int8 (5 of 6 cases won); from M = 16 on the tiles won every case.
constexpr int64_t kAmxRows = 8;

using BlocksFn = bool (*)(const Problem&, int64_t, int64_t);
using UnpackFn = bool (*)(const Problem&, int64_t, float*);

constexpr const char* kDisagree = ": the masks' popcounts disagree with block_offsets / values";

// Blocks [s0, s1) unpacked into `slab` (block s0's first row at its row 0) by `unpack(p, b, out)`, which writes
// block b at row b * kRows of `out`.
template <typename T, typename Unpack>
void unpack_slab(const char* op, const Problem& p, int64_t s0, int64_t s1, T* slab, Unpack unpack) {
  std::atomic<bool> ok{true};
  at::parallel_for(s0, s1, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!unpack(p, b, slab - s0 * kRows * p.Kp)) ok = false;
    }
  });
  TORCH_CHECK(ok.load(), op, kDisagree);
}

// Blocks per slab of unpacked weights: about `bytes` of them, so the slab stays in L2 while a GEMM reads it.
int64_t slab_blocks(const Problem& p, int64_t bytes, int64_t value_bytes) {
  return std::max<int64_t>(1, bytes / (kRows * p.Kp * value_bytes));
}

// Prefill with bf16 weights: y = x W^T slab by slab, each slab of output rows unpacked to fp32 into a buffer that
// stays in L2 and multiplied by torch's fp32 GEMM straight into its columns of y, so the dense weight never exists
// whole. (x W^T into y's columns ran 1.2-1.6x W x^T into y^T and a transpose, SmolLM2's lm_head the slowest.)
at::Tensor unpack_gemm(const char* op, const Problem& p, int64_t NB, const at::Tensor& xf, UnpackFn unpack) {
  const int64_t per_slab = slab_blocks(p, 4 << 20, 4);
  at::Tensor y = at::empty({p.M, p.N}, xf.options());
  at::Tensor slab = at::empty({std::min(NB, per_slab) * kRows, p.Kp}, xf.options());
  for (int64_t s0 = 0; s0 < NB; s0 += per_slab) {
    const int64_t s1 = std::min(NB, s0 + per_slab), n0 = s0 * kRows, rows = std::min(p.N, s1 * kRows) - n0;
    unpack_slab(op, p, s0, s1, slab.data_ptr<float>(), unpack);
    at::Tensor out = y.narrow(1, n0, rows);
    at::mm_out(out, xf, slab.narrow(0, 0, rows).t());
  }
  if (p.bias) y.add_(at::from_blob(const_cast<float*>(p.bias), {p.N}, xf.options()));
  return y;
}

// Prefill with bf16 weights and bf16 x, without bias, on the AVX-512 path: y = x W^T slab by slab on torch's bf16
// GEMM (oneDNN's AVX-512 BF16 kernels: the products summed in fp32 and rounded to bf16 once, as the kernels round),
// each slab of output rows unpacked to bf16.
at::Tensor bf16_gemm(const char* op, const Problem& p, int64_t NB, const at::Tensor& x2d) {
  const int64_t per_slab = slab_blocks(p, 2 << 20, 2);
  const at::Tensor xb = x2d.size(1) == p.Kp ? x2d : at::constant_pad_nd(x2d, {0, p.Kp - x2d.size(1)}, 0);
  at::Tensor y = at::empty({p.M, p.N}, x2d.options());
  at::Tensor slab = at::empty({std::min(NB, per_slab) * kRows, p.Kp}, x2d.options());
  for (int64_t s0 = 0; s0 < NB; s0 += per_slab) {
    const int64_t s1 = std::min(NB, s0 + per_slab), n0 = s0 * kRows, rows = std::min(p.N, s1 * kRows) - n0;
    unpack_slab(op, p, s0, s1, slab.data_ptr<c10::BFloat16>(),
                [](const Problem& q, int64_t b, c10::BFloat16* out) { return avx512_unpack_raw_block(q, b, out); });
    at::Tensor out = y.narrow(1, n0, rows);
    at::mm_out(out, xb, slab.narrow(0, 0, rows).t());
  }
  return y;
}

// Whether at::_int_mm gives exact int32 dot products in this process. oneDNN's int8 kernels for CPUs without VNNI add
// pairs of uint8 x int8 products in saturating int16 (vpmaddubsw), as they do where ONEDNN_MAX_CPU_ISA holds oneDNN
// below VNNI; checked once, on products that saturate there (127 * 127 + 128 * 127 > 32767).
bool int_mm_is_exact() {
  static const bool exact = [] {
    constexpr int64_t M = kInt8GemmRows, N = 16, K = 64;
    const auto opts = at::TensorOptions().dtype(at::kChar);
    at::Tensor a = at::empty({M, K}, opts), b = at::empty({N, K}, opts);
    int8_t* ap = a.data_ptr<int8_t>();
    int8_t* bp = b.data_ptr<int8_t>();
    for (int64_t i = 0; i < M * K; ++i) ap[i] = (i % 3 == 1) ? -128 : 127;
    for (int64_t i = 0; i < N * K; ++i) bp[i] = (i % 5 == 2) ? -127 : 127;
    at::Tensor dots;
    try {
      dots = at::_int_mm(a, b.t()).contiguous();
    } catch (const std::exception&) {  // a torch build without it: the kernel serves every M
      return false;
    }
    const int32_t* dp = dots.const_data_ptr<int32_t>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        int64_t want = 0;
        for (int64_t k = 0; k < K; ++k) want += int64_t{ap[m * K + k]} * bp[n * K + k];
        if (dp[m * N + n] != want) return false;
      }
    }
    return true;
  }();
  return exact;
}

// Prefill with int8 weights: y = x W^T slab by slab, each slab of output rows unpacked to dense int8 (it stays in L2)
// and multiplied by at::_int_mm with x shifted to int8 (q - 128, given back as 128 times the row's weight sum), then
// the epilogue every path shares, on the same exact integer dot products.
at::Tensor int8_gemm(const char* op, Problem p, int64_t NB, const at::Tensor& xq) {
  const int64_t per_slab = slab_blocks(p, 2 << 20, 1);
  const auto opts = xq.options();
  at::Tensor xs = at::empty({p.M, p.Kp}, opts.dtype(at::kChar));
  const uint8_t* qp = xq.const_data_ptr<uint8_t>();
  int8_t* sp = xs.data_ptr<int8_t>();
  at::parallel_for(0, p.M * p.Kp, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) sp[i] = static_cast<int8_t>(qp[i] ^ 0x80);
  });
  at::Tensor y = at::empty({p.M, p.N}, opts.dtype(at::kFloat));
  p.y = y.data_ptr<float>();
  at::Tensor slab = at::empty({std::min(NB, per_slab) * kRows, p.Kp}, opts.dtype(at::kChar));
  for (int64_t s0 = 0; s0 < NB; s0 += per_slab) {
    const int64_t s1 = std::min(NB, s0 + per_slab), n0 = s0 * kRows, rows = (s1 - s0) * kRows;
    unpack_slab(op, p, s0, s1, slab.data_ptr<int8_t>(),
                [](const Problem& q, int64_t b, int8_t* out) { return avx512_unpack_raw_block(q, b, out); });
    const at::Tensor dots = at::_int_mm(xs, slab.narrow(0, 0, rows).t()).contiguous();
    const int32_t* dp = dots.const_data_ptr<int32_t>();
    const int64_t width = std::min(p.N, n0 + rows) - n0;
    const int32_t* rs = p.row_sums + n0;
    const float* ws = p.weight_scale + n0;
    const float* bias = p.bias ? p.bias + n0 : nullptr;
    at::parallel_for(0, p.M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {  // store_output's arithmetic in its order, in a loop that vectorizes
        const int32_t* d = dp + m * rows;
        float* out = p.y + m * p.N + n0;
        const int32_t z = p.x_zero[m] - 128;
        const float xscale = p.x_scale[m];
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const float v = xscale * ws[j] * static_cast<float>(d[j] - z * rs[j]);
          out[j] = bias ? v + bias[j] : v;
        }
      }
    });
  }
  return y;
}

// The blocks split over the threads by nonzeros; each output is computed by one thread in a fixed order.
void run_blocks(const char* op, const Problem& p, int64_t NB, BlocksFn run) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), NB));
  const std::vector<int64_t> bounds = split_blocks(p.block_offsets, NB, parts);
  std::atomic<bool> ok{true};
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!run(p, bounds[t], bounds[t + 1])) ok = false;
    }
  });
  TORCH_CHECK(ok.load(), op, kDisagree);
}

// Round to nearest even, as torch.round and std::nearbyint do, for |t| < 2^22 (all that quantization meets: |x / s|
// <= 255): adding and taking away 1.5 * 2^23 leaves t rounded, in two plain adds that vectorize.
inline float round_even(float t) { return (t + 12582912.0f) - 12582912.0f; }

// Per-row uint8 quantization of x [M, K] (fp32 or bf16, read as it is) into a zero-padded [M, Kp] buffer; writes
// scale and zero point. Asymmetric: s = (max - min) / 255 and the zero point that maps 0 exactly. Symmetric (the
// int8 scheme of compressed-tensors checkpoints): s = max|x| / 127.5, the int8 range [-128, 127] shifted by 128.
// Rounding is to nearest even, as torch.round, so a Python reference reproduces it.
template <typename T>
bool quantize_rows(const T* xp, int64_t M, int64_t K, int64_t Kp, bool symmetric, uint8_t* qp, float* sp,
                   int32_t* zp) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = xp + m * K;  // read as float element by element: bf16 widens exactly
      float lo = 0.0f, hi = 0.0f, poison = 0.0f;  // poison: inf * 0 and nan * 0 are nan
      // Vectorized whatever the order: min, max and a nan-or-zero sum do not depend on it.
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : poison)
      for (int64_t k = 0; k < K; ++k) {
        const float v = static_cast<float>(row[k]);
        poison += v * 0.0f;
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      if (poison != 0.0f) {
        finite = false;
        continue;
      }
      float s = symmetric ? std::max(-lo, hi) / 127.5f : (hi - lo) / 255.0f;
      if (s == 0.0f) s = 1.0f;
      const float z = symmetric ? 128.0f : std::min(255.0f, std::max(0.0f, round_even(-lo / s)));
      uint8_t* q = qp + m * Kp;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {  // clamped to [0, 255] by selects (a branch would stop the vectorizing)
        const float t = round_even(static_cast<float>(row[k]) / s) + z;
        q[k] = static_cast<uint8_t>(static_cast<int32_t>(t < 0.0f ? 0.0f : (t > 255.0f ? 255.0f : t)));
      }
      std::memset(q + K, 0, Kp - K);
      sp[m] = s;
      zp[m] = static_cast<int32_t>(z);
    }
  });
  return finite.load();
}

void quantize_x(const at::Tensor& x2d, int64_t Kp, bool symmetric, uint8_t* qp, float* sp, int32_t* zp) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const bool finite = x2d.scalar_type() == at::kFloat
                          ? quantize_rows(x2d.const_data_ptr<float>(), M, K, Kp, symmetric, qp, sp, zp)
                          : quantize_rows(x2d.const_data_ptr<c10::BFloat16>(), M, K, Kp, symmetric, qp, sp, zp);
  TORCH_CHECK(finite, "int8 linear: x holds inf or nan; it cannot be quantized");
}

at::Tensor quantize_rows_u8(const at::Tensor& x2d, int64_t Kp, bool symmetric, at::Tensor& scale, at::Tensor& zero) {
  const int64_t M = x2d.size(0);
  at::Tensor q = at::empty({M, Kp}, x2d.options().dtype(at::kByte));
  scale = at::empty({M}, x2d.options().dtype(at::kFloat));
  zero = at::empty({M}, x2d.options().dtype(at::kInt));
  quantize_x(x2d, Kp, symmetric, q.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<int32_t>());
  return q;
}

// x rounded to bf16 (as torch rounds) and widened to fp32, zero-padded to Kp columns, in one pass: [M, Kp] for AVX2;
// for AVX-512 each chunk of C columns holds its even columns, then its odd ones (the pairs vdpbf16ps multiplies).
template <typename T>
void widen_rows(const T* xp, int64_t M, int64_t K, int64_t Kp, int64_t C, bool split_pairs, float* op) {
  const int64_t half = split_pairs ? C / 2 : 0;
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = xp + m * K;
      float* dst = op + m * Kp;
      for (int64_t k0 = 0; k0 < Kp; k0 += C) {  // column k0 + 2j + e lands at k0 + j + e * half (else in place)
        for (int64_t i = 0; i < C; ++i) {
          const int64_t k = k0 + i;
          const float v = k < K ? static_cast<float>(c10::BFloat16(static_cast<float>(row[k]))) : 0.0f;
          dst[split_pairs ? k0 + i / 2 + (i % 2) * half : k] = v;
        }
      }
    }
  });
}

void widen_into(const at::Tensor& x2d, int64_t Kp, int64_t C, bool split_pairs, float* out) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  if (x2d.scalar_type() == at::kFloat) {
    widen_rows(x2d.const_data_ptr<float>(), M, K, Kp, C, split_pairs, out);
  } else {
    widen_rows(x2d.const_data_ptr<c10::BFloat16>(), M, K, Kp, C, split_pairs, out);
  }
}

at::Tensor widen_x(const at::Tensor& x2d, int64_t Kp, int64_t C, bool split_pairs) {
  at::Tensor out = at::empty({x2d.size(0), Kp}, x2d.options().dtype(at::kFloat));
  widen_into(x2d, Kp, C, split_pairs, out.data_ptr<float>());
  return out;
}

// dst[i] = src[i] rounded to bf16, to nearest even as Tensor.to rounds (threads only for long runs).
void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = c10::BFloat16(src[i]);
  });
}

// Up to this many rows of x (decode), the AVX-512 and AVX2 paths keep their temporaries in per-thread scratch: the
// call then allocates only its output. Bounded so that scratch stays small (y of a 128k-vocabulary head: 2 MiB).
constexpr int64_t kScratchRows = 4;

// Per-thread buffer `slot` (0: x quantized or widened, 1: its int8 scales and zero points, 2: y in fp32, 3: the
// quantized x widened to int16 for AVX2) of at least `bytes`, 64-byte aligned; grown when a call needs more, kept.
uint8_t* scratch(int slot, size_t bytes) {
  struct Buffer {
    std::unique_ptr<uint8_t, decltype(&std::free)> data{nullptr, &std::free};
    size_t size = 0;
  };
  thread_local Buffer buffers[4];
  Buffer& b = buffers[slot];
  if (b.size < bytes) {
    const size_t size = (bytes + 63) / 64 * 64;
    b.data.reset(static_cast<uint8_t*>(std::aligned_alloc(64, size)));
    TORCH_CHECK(b.data, "linear: cannot allocate ", size, " bytes of scratch");
    b.size = size;
  }
  return b.data.get();
}

// t as contiguous fp32 (no copy when it already is one): the per-call scales and bias.
at::Tensor as_float_vector(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.reshape({-1}).to(at::kFloat).contiguous();
}

struct Weights {
  const char* op;
  at::Tensor values, masks, block_offsets, row_sums;
  int64_t N, K;
  bool x_symmetric;  // int8 weights: how x is quantized (quantize_rows)
};

// Shapes, dtypes and offsets of the prepacked tensors, checked before any kernel reads them.
void check_weights(const Weights& w, const std::optional<at::Tensor>& weight_scale,
                   const std::optional<at::Tensor>& bias) {
  const char* op = w.op;
  TORCH_CHECK(w.N >= 0 && w.K >= 0, op, ": out_features and in_features must be >= 0");
  const at::ScalarType dtype = w.values.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kChar, op, ": values must be bfloat16 or int8, got ", dtype);
  TORCH_CHECK(w.values.device().is_cpu() && w.values.is_contiguous(), op, ": values must be a contiguous CPU tensor");
  const int64_t C = chunk_width(dtype), NB = ceil_div(w.N, kRows), KC = ceil_div(w.K, C);
  if (w.masks.defined()) {
    TORCH_CHECK(w.values.dim() == 1, op, ": values must be 1-D, got shape ", w.values.sizes());
    TORCH_CHECK(w.masks.scalar_type() == at::kByte && w.masks.is_contiguous() &&
                    w.masks.sizes() == at::IntArrayRef({NB, KC, kRows * C / 8}),
                op, ": masks must be contiguous uint8 [", NB, ", ", KC, ", ", kRows * C / 8, "], got ",
                w.masks.sizes());
    TORCH_CHECK(w.block_offsets.scalar_type() == at::kLong && w.block_offsets.is_contiguous() &&
                    w.block_offsets.dim() == 1 && w.block_offsets.size(0) == NB + 1,
                op, ": block_offsets must be contiguous int64 [", NB + 1, "], got ", w.block_offsets.sizes());
    const int64_t* bo = w.block_offsets.const_data_ptr<int64_t>();
    TORCH_CHECK(bo[0] == 0 && bo[NB] + C == w.values.numel(), op, ": block_offsets must run from 0 to ",
                w.values.numel() - C, " (the number of values less the slack of ", C, ")");
    for (int64_t b = 0; b < NB; ++b) {
      TORCH_CHECK(bo[b] <= bo[b + 1], op, ": block_offsets must not decrease (at block ", b, ")");
    }
  } else {
    TORCH_CHECK(w.values.sizes() == at::IntArrayRef({NB, KC, kRows, C}), op, ": values must be [", NB, ", ", KC,
                ", ", kRows, ", ", C, "], got ", w.values.sizes());
  }
  if (dtype == at::kChar) {
    TORCH_CHECK(w.row_sums.scalar_type() == at::kInt && w.row_sums.is_contiguous() &&
                    w.row_sums.dim() == 1 && w.row_sums.size(0) == NB * kRows,
                op, ": row_sums must be contiguous int32 [", NB * kRows, "] for int8 values");
    TORCH_CHECK(weight_scale.has_value() && weight_scale->numel() == w.N, op,
                ": int8 values need weight_scale with ", w.N, " elements (one per output row)");
  } else {
    TORCH_CHECK(!weight_scale.has_value(), op, ": weight_scale is only for int8 values");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N, op, ": bias must be [", w.N, "], got ", bias->sizes());
  }
}

// The path isa asks for at M rows of x: a forced one must be there; auto takes the best the CPU has.
KernelPath choose_path(const char* op, c10::string_view isa, int64_t M) {
  const std::string name(isa);
  if (name == "auto") {
    if (M >= kAmxRows && has_path(KernelPath::kAmx)) return KernelPath::kAmx;
    for (KernelPath path : {KernelPath::kAvx512, KernelPath::kAvx2}) {
      if (has_path(path)) return path;
    }
    return KernelPath::kReference;
  }
  return forced_path(op, name);
}

// Each bitmap block's masks must hold as many set bits as block_offsets gives it values: the reference path reads
// values by the masks (the kernels check as they go).
void check_masks_agree(const Weights& w, int64_t NB, int64_t KC, int64_t C) {
  const uint8_t* mp = w.masks.const_data_ptr<uint8_t>();
  const int64_t* bo = w.block_offsets.const_data_ptr<int64_t>();
  const int64_t words = KC * kRows * C / 64;  // a block's masks are a whole number of 64-bit words
  for (int64_t b = 0; b < NB; ++b) {
    int64_t set = 0;
    for (int64_t i = 0; i < words; ++i) {
      uint64_t word;
      std::memcpy(&word, mp + (b * words + i) * 8, 8);
      set += __builtin_popcountll(word);
    }
    TORCH_CHECK(set == bo[b + 1] - bo[b], w.op, kDisagree);
  }
}

// The dense weight rebuilt, then exact integer dot products in fp64 and the kernels' fp32 epilogue (int8), or an fp32
// matmul of the bf16-rounded operands (bf16).
at::Tensor reference_linear(const at::Tensor& x2d, const Weights& w, const Problem& p, const at::Tensor& xq) {
  const at::Tensor dense = prepacked_to_dense(w.values, w.masks, w.block_offsets, w.N, w.K);
  if (!p.row_sums) return at::matmul(x2d.to(at::kBFloat16).to(at::kFloat), dense.to(at::kFloat).t());
  const at::TensorOptions f32 = x2d.options().dtype(at::kFloat);
  const at::Tensor x_scale = at::from_blob(const_cast<float*>(p.x_scale), {p.M}, f32);
  const at::Tensor x_zero = at::from_blob(const_cast<int32_t*>(p.x_zero), {p.M}, f32.dtype(at::kInt));
  const at::Tensor w_scale = at::from_blob(const_cast<float*>(p.weight_scale), {p.N}, f32);
  const at::Tensor wd = dense.to(at::kDouble);
  const at::Tensor dots = at::matmul(xq.narrow(1, 0, w.K).to(at::kDouble), wd.t()) -
                          x_zero.to(at::kDouble).unsqueeze(1) * wd.sum(1).unsqueeze(0);
  return (x_scale.unsqueeze(1) * w_scale.unsqueeze(0)) * dots.to(at::kFloat);
}

// x [M, K] in the layout `path` reads (linear_kernels.h), zero-padded to Kp columns; xq is x quantized (int8 weights).
at::Tensor lay_out_x(KernelPath path, const at::Tensor& x2d, const at::Tensor& xq, int64_t Kp, int64_t C) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  if (path == KernelPath::kAmx) {  // B tiles [M/16][KC][16 column pairs or quads][16 rows], rows padded with zeros
    const int64_t Mp = ceil_div(M, kAmxTileRows) * kAmxTileRows, E = xq.defined() ? 4 : 2;
    const at::Tensor xs = xq.defined() ? at::constant_pad_nd(xq, {0, 0, 0, Mp - M}, 0)
                                       : at::constant_pad_nd(x2d.to(at::kBFloat16), {0, Kp - K, 0, Mp - M}, 0);
    return xs.view({Mp / kAmxTileRows, kAmxTileRows, Kp / C, 16, E}).permute({0, 2, 3, 1, 4}).contiguous();
  }
  if (xq.defined()) return path == KernelPath::kAvx2 ? xq.to(at::kShort) : xq;
  return widen_x(x2d, Kp, C, path != KernelPath::kAvx2);
}

// The AVX-512 or AVX2 loops for at most kScratchRows rows of x, temporaries in scratch: x quantized (int8 weights,
// widened to int16 for AVX2) or widened, y in fp32 written straight into the output or rounded into it.
at::Tensor small_linear(const char* op, KernelPath path, const at::Tensor& x2d, Problem p, int64_t NB,
                        at::IntArrayRef out_shape, bool x_symmetric) {
  const int64_t M = p.M, Kp = p.Kp;
  const at::ScalarType dtype = x2d.scalar_type();
  if (p.row_sums) {
    uint8_t* q = scratch(0, M * Kp);
    float* sp = reinterpret_cast<float*>(scratch(1, M * 8));
    int32_t* zp = reinterpret_cast<int32_t*>(sp + M);
    quantize_x(x2d, Kp, x_symmetric, q, sp, zp);
    p.x = q, p.x_scale = sp, p.x_zero = zp;
    if (path == KernelPath::kAvx2) {
      int16_t* wide = reinterpret_cast<int16_t*>(scratch(3, M * Kp * 2));
      for (int64_t i = 0; i < M * Kp; ++i) wide[i] = q[i];
      p.x = reinterpret_cast<const uint8_t*>(wide);
    }
  } else {
    float* xf = reinterpret_cast<float*>(scratch(0, M * Kp * 4));
    widen_into(x2d, Kp, chunk_width(at::kBFloat16), path != KernelPath::kAvx2, xf);
    p.x = reinterpret_cast<const uint8_t*>(xf);
  }
  at::Tensor out = at::empty(out_shape, x2d.options());
  p.y = dtype == at::kFloat ? out.data_ptr<float>() : reinterpret_cast<float*>(scratch(2, M * p.N * 4));
  run_blocks(op, p, NB, path == KernelPath::kAvx512 ? &avx512_blocks : &avx2_blocks);
  if (dtype != at::kFloat) round_to_bf16(p.y, out.data_ptr<c10::BFloat16>(), M * p.N);
  return out;
}

at::Tensor run_linear(const at::Tensor& x, const Weights& w, const std::optional<at::Tensor>& weight_scale,
                      const std::optional<at::Tensor>& bias, c10::string_view isa) {
  const char* op = w.op;
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.K, op, ": x must be [..., ", w.K, "], got shape ", x.sizes());
  check_weights(w, weight_scale, bias);
  const at::Tensor x2d = x.reshape({-1, w.K}).contiguous();
  const int64_t M = x2d.size(0);
  KernelPath path = choose_path(op, isa, M);
  if (M == 0 || w.N == 0) path = KernelPath::kReference;

  const bool int8 = w.values.scalar_type() == at::kChar;
  const int64_t C = chunk_width(w.values.scalar_type()), NB = ceil_div(w.N, kRows), KC = ceil_div(w.K, C);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.N;
  const at::Tensor scale32 = int8 ? as_float_vector(*weight_scale) : at::Tensor();
  const at::Tensor bias32 = bias.has_value() ? as_float_vector(*bias) : at::Tensor();
  Problem p{nullptr, M, KC * C, w.N, KC, static_cast<const uint8_t*>(w.values.const_data_ptr()),
            w.masks.defined() ? w.masks.const_data_ptr<uint8_t>() : nullptr,
            w.masks.defined() ? w.block_offsets.const_data_ptr<int64_t>() : nullptr,
            int8 ? w.row_sums.const_data_ptr<int32_t>() : nullptr, int8 ? scale32.const_data_ptr<float>() : nullptr,
            nullptr, nullptr, bias32.defined() ? bias32.const_data_ptr<float>() : nullptr, nullptr};
  if (M <= kScratchRows && (path == KernelPath::kAvx512 || path == KernelPath::kAvx2)) {
    return small_linear(op, path, x2d, p, NB, out_shape, w.x_symmetric);
  }
  at::Tensor xq, x_scale, x_zero;
  if (int8) {
    xq = quantize_rows_u8(x2d, KC * C, w.x_symmetric, x_scale, x_zero);
    p.x_scale = x_scale.const_data_ptr<float>(), p.x_zero = x_zero.const_data_ptr<int32_t>();
  }

  at::Tensor y;
  if (path == KernelPath::kReference) {
    if (w.masks.defined()) check_masks_agree(w, NB, KC, C);
    y = reference_linear(x2d, w, p, xq);
    if (bias32.defined()) y.add_(bias32);
  } else if (int8 && M >= kInt8GemmRows && path == KernelPath::kAvx512 && int_mm_is_exact()) {
    y = int8_gemm(op, p, NB, xq);
  } else if (!int8 && M >= kGemmRows && path == KernelPath::kAvx512 && x2d.scalar_type() == at::kBFloat16 &&
             !p.bias) {
    y = bf16_gemm(op, p, NB, x2d);
  } else if (!int8 && M >= kGemmRows && path != KernelPath::kAmx) {
    y = unpack_gemm(op, p, NB, widen_x(x2d, KC * C, C, false),
                    path == KernelPath::kAvx512 ? &avx512_unpack_block : &avx2_unpack_block);
  } else {
    const at::Tensor xl = lay_out_x(path, x2d, xq, KC * C, C);
    y = at::empty({M, w.N}, x2d.options().dtype(at::kFloat));
    p.x = static_cast<const uint8_t*>(xl.const_data_ptr());
    p.y = y.data_ptr<float>();
    if (path == KernelPath::kAmx) {
      TORCH_CHECK(amx_linear(p), op, kDisagree);
    } else {
      run_blocks(op, p, NB, path == KernelPath::kAvx512 ? &avx512_blocks : &avx2_blocks);
    }
  }
  return to_dtype(y, x.scalar_type()).view(out_shape);
}

}  // namespace

// fp32 `result` in `dtype` (fp32 or bf16): bf16 rounded to nearest even as Tensor.to rounds, in one loop.
at::Tensor to_dtype(const at::Tensor& result, at::ScalarType dtype) {
  const at::Tensor y = result.contiguous();
  if (y.scalar_type() == dtype) return y;  // fp32 asked, or bf16 already (the bf16 prefill GEMM)
  at::Tensor out = at::empty(y.sizes(), y.options().dtype(dtype));
  round_to_bf16(y.const_data_ptr<float>(), out.data_ptr<c10::BFloat16>(), y.numel());
  return out;
}

int64_t amx_min_rows() { return kAmxRows; }

int64_t int8_gemm_rows() { return int_mm_is_exact() ? kInt8GemmRows : 0; }

std::vector<int64_t> split_blocks(const int64_t* block_offsets, int64_t NB, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, NB);
  bounds[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    if (!block_offsets) {
      bounds[t] = NB * t / parts;
      continue;
    }
    const int64_t target = block_offsets[NB] * t / parts;
    bounds[t] = std::max(bounds[t - 1], std::lower_bound(block_offsets, block_offsets + NB, target) - block_offsets);
  }
  return bounds;
}

at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& masks,
                         const at::Tensor& block_offsets, const at::Tensor& row_sums, int64_t out_features,
                         int64_t in_features, const std::optional<at::Tensor>& weight_scale,
                         const std::optional<at::Tensor>& bias, c10::string_view isa, bool x_symmetric) {
  TORCH_CHECK(masks.defined() && block_offsets.defined(), "bitmap_linear: masks and block_offsets are required");
  return run_linear(
      x, {"bitmap_linear", values, masks, block_offsets, row_sums, out_features, in_features, x_symmetric},
      weight_scale, bias, isa);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_sums,
                        int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& weight_scale,
                        const std::optional<at::Tensor>& bias, c10::string_view isa, bool x_symmetric) {
  return run_linear(
      x, {"dense_linear", values, at::Tensor(), at::Tensor(), row_sums, out_features, in_features, x_symmetric},
      weight_scale, bias, isa);
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) {
  m.impl("bitmap_linear", &bitmap_linear);
  m.impl("dense_linear", &dense_linear);
}

}  // namespace sparamx
