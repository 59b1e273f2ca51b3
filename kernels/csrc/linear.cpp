// y = x @ W^T (+ bias) for prepacked weights (packed_format.h): bitmap or dense, bf16 or int8.
//
// AVX-512 path, any M: per block of kRows output rows and per chunk of columns, one 512-bit register of weights per
// row -- expand-loaded (vpexpandw / vpexpandb) from the row's next popcount(mask) values for the bitmap format, a
// plain load for dense -- then for each of up to 4 activation rows one load and kRows dot products (vdpbf16ps into
// fp32 lanes, or vpdpbusd of uint8 activations with int8 weights into int32 lanes). Activation rows are taken 64 at a
// time (they stay in L2) and, within one block, 4 at a time (the block's weights stay in L1), so weights stream from
// memory once per 64 rows of x.
// int8: weights per output channel symmetric (w = scale * q); activations quantized per row on the fly, asymmetric
// to uint8 (x = sx * (q - z), zero exact), so y = sx * sw * (sum q_x q_w - z * sum q_w).
// AMX path (linear_amx.cpp), from kAmxRows activation rows on where the CPU has it, or at any M when forced: tiles.
// From kGemmRows activation rows on (prefill) without AMX, bf16 weights are unpacked slab by slab and multiplied by
// torch's fp32 GEMM instead. Reference path: the dense weight rebuilt and multiplied in fp32 (bf16) or exactly in fp64 (int8):
// the same numbers up to summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "linear_kernels.h"
#include "packed_format.h"

namespace sparamx {

at::Tensor prepacked_to_dense(const at::Tensor& values, const at::Tensor& masks, const at::Tensor& block_offsets,
                              int64_t N, int64_t K);

namespace {

// Software prefetch distance into the weight stream, in bytes. Measured on 2 cores streaming from DRAM: without it
// the bitmap kernels reached ~62% of the read bandwidth, at 2 KiB ~80%, at 4 KiB ~85-90% (eval/results/kernels.md).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kTileRows = 64;  // activation rows per pass over the weights
// From this many activation rows on (prefill), bf16 weights are unpacked slab by slab and multiplied by torch's
// fp32 GEMM (the same numbers: bf16 products are exact in fp32): the expand-load kernel has no register blocking over
// M. Measured side by side (Llama-3-8B shapes, 50%): at M = 16 the kernel runs 1.4-1.7x torch bf16 where fp32 GEMM
// runs 0.9x; at M = 64 the GEMM path runs 1.13-1.17x where the kernel ran 0.88-1.16x (down_proj the slowest).
constexpr int64_t kGemmRows = 64;
// From this many activation rows on, where the CPU has AMX, isa=auto runs the tile path (linear_amx.cpp). Measured
// side by side on a 16-core Xeon with AMX (4096x4096 and 14336x4096, bitmap 50% and dense, 2 and 16 threads, weights
// in cache): at M = 4 the AVX-512 kernel won 10 of 12 cases; at M = 8 the tiles ran 1.5-2.2x it for bf16 and
// 0.94-1.5x for int8 (5 of 6 cases won); from M = 16 on the tiles won every case.
constexpr int64_t kAmxRows = 8;

// ---- ISA-specific code: only here, after every include, so no inline function of a header is compiled for
// AVX-512 and then picked by the linker for a machine without it.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,avx512bf16")

// Rows [b*kRows, b*kRows + kRows) of y for activation rows [m0, m0 + MB). A bitmap block whose masks ask for more
// values than the block holds, or fewer, returns false before reading past it.
template <bool Int8, bool Sparse, int MB>
bool block_avx512(const Problem& p, int64_t b, int64_t m0) {
  using Acc = std::conditional_t<Int8, __m512i, __m512>;
  constexpr int64_t C = Int8 ? 64 : 32, E = Int8 ? 1 : 2, MaskBytes = C / 8;
  Acc acc[MB][kRows];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRows; ++r) {
      if constexpr (Int8) acc[i][r] = _mm512_setzero_si512();
      else acc[i][r] = _mm512_setzero_ps();
    }
  const uint8_t* v;
  const uint8_t* end = nullptr;
  const uint8_t* mk = nullptr;
  if constexpr (Sparse) {
    v = p.values + p.block_offsets[b] * E;
    end = p.values + p.block_offsets[b + 1] * E;
    mk = p.masks + b * p.KC * kRows * MaskBytes;
  } else {
    v = p.values + b * p.KC * kRows * C * E;
  }
  const uint8_t* x = p.x + m0 * p.Kp * (Int8 ? 1 : 4);
  for (int64_t c = 0; c < p.KC; ++c) {
    __m512i w[kRows];
    if constexpr (Sparse) {
      uint64_t bits[kRows];
      int64_t count[kRows], total = 0;
      for (int r = 0; r < kRows; ++r) {
        // Whole-width loads: a 4-byte copy into a zeroed 8-byte word costs a store-forwarding stall per mask.
        if constexpr (Int8) {
          std::memcpy(&bits[r], mk + r * MaskBytes, 8);
        } else {
          uint32_t b32;
          std::memcpy(&b32, mk + r * MaskBytes, 4);
          bits[r] = b32;
        }
        count[r] = __builtin_popcountll(bits[r]);
        total += count[r];
      }
      mk += kRows * MaskBytes;
      if (v + total * E > end) return false;
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mk) + kPrefetchBytes / 4, _MM_HINT_T0);
      for (int r = 0; r < kRows; ++r) {
        // A full load then a register expand: values end with a register of slack (packed_format.h).
        const __m512i raw = _mm512_loadu_si512(v);
        if constexpr (Int8) w[r] = _mm512_maskz_expand_epi8(bits[r], raw);
        else w[r] = _mm512_maskz_expand_epi16(static_cast<__mmask32>(bits[r]), raw);
        v += count[r] * E;
      }
    } else {
      for (int r = 0; r < kRows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes + r * 64, _MM_HINT_T0);
        w[r] = _mm512_loadu_si512(v + r * C * E);
      }
      v += kRows * C * E;
    }
    if constexpr (Int8) {
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_loadu_si512(x + i * p.Kp + c * C);
        for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], xv, w[r]);
      }
    } else {
      // bf16 -> fp32 without a shuffle: a dword's low half shifted up is its even element, the high half masked is
      // its odd one. x comes split the same way, so two FMAs take the 32 products (vdpbf16ps has a quarter of
      // vfmadd231ps's throughput on the cores measured).
      __m512 even[kRows], odd[kRows];
      for (int r = 0; r < kRows; ++r) {
        even[r] = _mm512_castsi512_ps(_mm512_slli_epi32(w[r], 16));
        odd[r] = _mm512_castsi512_ps(_mm512_and_si512(w[r], _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
      }
      for (int i = 0; i < MB; ++i) {
        const float* xf = reinterpret_cast<const float*>(x) + i * p.Kp + c * C;
        const __m512 xe = _mm512_loadu_ps(xf), xo = _mm512_loadu_ps(xf + 16);
        for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_fmadd_ps(odd[r], xo, _mm512_fmadd_ps(even[r], xe, acc[i][r]));
      }
    }
  }
  if (Sparse && v != end) return false;
  const int64_t rows = std::min(kRows, p.N - b * kRows);
  for (int i = 0; i < MB; ++i) {
    float* y = p.y + (m0 + i) * p.N + b * kRows;
    for (int r = 0; r < rows; ++r) {
      const int64_t n = b * kRows + r;
      float out;
      if constexpr (Int8) {
        const int32_t dot = _mm512_reduce_add_epi32(acc[i][r]) - p.x_zero[m0 + i] * p.row_sums[n];
        out = p.x_scale[m0 + i] * p.weight_scale[n] * static_cast<float>(dot);
      } else {
        out = _mm512_reduce_add_ps(acc[i][r]);
      }
      y[r] = p.bias ? out + p.bias[n] : out;
    }
  }
  return true;
}

// bf16 block b as fp32 rows [b*kRows, b*kRows + kRows) of `out` (row stride Kp floats), for the prefill GEMM.
template <bool Sparse>
bool unpack_block_avx512(const Problem& p, int64_t b, float* out) {
  const uint8_t* v = Sparse ? p.values + p.block_offsets[b] * 2 : p.values + b * p.KC * kRows * 64;
  const uint8_t* end = Sparse ? p.values + p.block_offsets[b + 1] * 2 : nullptr;
  const uint8_t* mk = Sparse ? p.masks + b * p.KC * kRows * 4 : nullptr;
  for (int64_t c = 0; c < p.KC; ++c) {
    for (int r = 0; r < kRows; ++r) {
      __m512i w;
      if constexpr (Sparse) {
        uint32_t bits;
        std::memcpy(&bits, mk + r * 4, 4);
        const int64_t count = __builtin_popcount(bits);
        if (v + count * 2 > end) return false;
        w = _mm512_maskz_expand_epi16(bits, _mm512_loadu_si512(v));  // values end with a register of slack
        v += count * 2;
      } else {
        w = _mm512_loadu_si512(v);
        v += 64;
      }
      float* dst = out + (b * kRows + r) * p.Kp + c * 32;
      _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16)));
      _mm512_storeu_ps(dst + 16,
                       _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16)));
    }
    if constexpr (Sparse) mk += kRows * 4;
  }
  return !Sparse || v == end;
}

#pragma GCC pop_options
// ---- end of ISA-specific code

// Prefill with bf16 weights: y^T = W x^T slab by slab, each slab of output rows unpacked to fp32 into a buffer that
// stays in L2 and multiplied by torch's fp32 GEMM, so the dense weight never exists whole.
at::Tensor gemm_avx512(const Problem& p, int64_t NB, const at::Tensor& xf) {
  constexpr int64_t kSlabBlocks = 64;  // 256 rows: 4 MiB of fp32 at K = 4096
  at::Tensor yt = at::empty({NB * kRows, p.M}, xf.options());
  at::Tensor slab = at::empty({kSlabBlocks * kRows, p.Kp}, xf.options());
  float* buf = slab.data_ptr<float>();
  for (int64_t s0 = 0; s0 < NB; s0 += kSlabBlocks) {
    const int64_t s1 = std::min(NB, s0 + kSlabBlocks);
    std::atomic<bool> ok{true};
    at::parallel_for(s0, s1, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* rows = buf - s0 * kRows * p.Kp;  // block b lands at row (b - s0) * kRows of the slab
        if (!(p.masks ? unpack_block_avx512<true>(p, b, rows) : unpack_block_avx512<false>(p, b, rows))) ok = false;
      }
    });
    TORCH_CHECK(ok.load(), "bitmap_linear: the masks' popcounts disagree with block_offsets / values");
    const int64_t rows = (s1 - s0) * kRows;
    at::Tensor out = yt.narrow(0, s0 * kRows, rows);  // contiguous: whole rows of y^T
    at::mm_out(out, slab.narrow(0, 0, rows), xf.t());
  }
  at::Tensor y = yt.narrow(0, 0, p.N).t();
  if (p.bias) y = y + at::from_blob(const_cast<float*>(p.bias), {p.N}, xf.options());
  return y.contiguous();
}

template <bool Int8, bool Sparse>
bool blocks_avx512(const Problem& p, int64_t b0, int64_t b1) {
  bool ok = true;
  for (int64_t t = 0; t < p.M; t += kTileRows) {
    const int64_t t1 = std::min(p.M, t + kTileRows);
    for (int64_t b = b0; b < b1 && ok; ++b) {
      int64_t m = t;
      for (; m + 4 <= t1; m += 4) ok &= block_avx512<Int8, Sparse, 4>(p, b, m);
      switch (t1 - m) {
        case 3: ok &= block_avx512<Int8, Sparse, 3>(p, b, m); break;
        case 2: ok &= block_avx512<Int8, Sparse, 2>(p, b, m); break;
        case 1: ok &= block_avx512<Int8, Sparse, 1>(p, b, m); break;
        default: break;
      }
    }
  }
  return ok;
}

void run_avx512(const Problem& p, bool int8, int64_t NB) {
  const bool sparse = p.masks != nullptr;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), NB));
  const std::vector<int64_t> bounds = split_blocks(p.block_offsets, NB, parts);
  std::atomic<bool> ok{true};
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = bounds[t], b1 = bounds[t + 1];
      bool done;
      if (int8) done = sparse ? blocks_avx512<true, true>(p, b0, b1) : blocks_avx512<true, false>(p, b0, b1);
      else done = sparse ? blocks_avx512<false, true>(p, b0, b1) : blocks_avx512<false, false>(p, b0, b1);
      if (!done) ok = false;
    }
  });
  TORCH_CHECK(ok.load(), "bitmap_linear: the masks' popcounts disagree with block_offsets / values");
}

// Per-row asymmetric uint8 quantization of x [M, K] into a zero-padded [M, Kp] buffer; writes scale and zero point.
// Rounding is to nearest even, as torch.round, so a Python reference reproduces it exactly.
at::Tensor quantize_rows_u8(const at::Tensor& x32, int64_t Kp, at::Tensor& scale, at::Tensor& zero) {
  const int64_t M = x32.size(0), K = x32.size(1);
  at::Tensor q = at::zeros({M, Kp}, x32.options().dtype(at::kByte));
  scale = at::empty({M}, x32.options());
  zero = at::empty({M}, x32.options().dtype(at::kInt));
  const float* xp = x32.const_data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* zp = zero.data_ptr<int32_t>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * K;
      float lo = 0.0f, hi = 0.0f;
      bool ok = true;
      for (int64_t k = 0; k < K; ++k) {
        ok &= std::isfinite(row[k]);
        lo = std::min(lo, row[k]);
        hi = std::max(hi, row[k]);
      }
      if (!ok) {
        finite = false;
        continue;
      }
      float s = (hi - lo) / 255.0f;
      if (s == 0.0f) s = 1.0f;
      const float z = std::min(255.0f, std::max(0.0f, std::nearbyint(-lo / s)));
      for (int64_t k = 0; k < K; ++k) {
        qp[m * Kp + k] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(row[k] / s) + z)));
      }
      sp[m] = s;
      zp[m] = static_cast<int32_t>(z);
    }
  });
  TORCH_CHECK(finite.load(), "int8 linear: x holds inf or nan; it cannot be quantized");
  return q;
}

struct Weights {
  const char* op;
  at::Tensor values, masks, block_offsets, row_sums;
  int64_t N, K;
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

at::Tensor run_linear(const at::Tensor& x, const Weights& w, const std::optional<at::Tensor>& weight_scale,
                      const std::optional<at::Tensor>& bias, c10::string_view isa) {
  const char* op = w.op;
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.K, op, ": x must be [..., ", w.K, "], got shape ", x.sizes());
  check_weights(w, weight_scale, bias);
  TORCH_CHECK(isa == "auto" || isa == "reference" || isa == "avx512" || isa == "amx", op,
              ": isa must be auto, reference, avx512 or amx, got ", std::string(isa));
  const bool avx512 = has_avx512_kernels();
  TORCH_CHECK(isa != "avx512" || avx512, op, ": isa=avx512 forced but this CPU lacks AVX-512 F/BW/VL/VBMI2/VNNI/BF16");
  TORCH_CHECK(isa != "amx" || has_amx_kernels(), op,
              ": isa=amx forced but this CPU (or the OS) does not give AMX tile/bf16/int8 with AVX-512");

  const bool int8 = w.values.scalar_type() == at::kChar;
  const int64_t C = chunk_width(w.values.scalar_type()), NB = ceil_div(w.N, kRows), KC = ceil_div(w.K, C);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.N;
  const at::Tensor x2d = x.reshape({-1, w.K});
  const int64_t M = x2d.size(0);
  const at::Tensor scale32 = int8 ? weight_scale->reshape({-1}).to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  at::Tensor xq, x_scale, x_zero;
  if (int8) xq = quantize_rows_u8(x2d.to(at::kFloat).contiguous(), KC * C, x_scale, x_zero);
  at::Tensor y;
  const bool reference = isa == "reference" || !avx512 || M == 0 || w.N == 0;
  if (reference) {
    if (w.masks.defined()) {  // values are read by the masks: they must agree first
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
        TORCH_CHECK(set == bo[b + 1] - bo[b], op, ": the masks' popcounts disagree with block_offsets / values");
      }
    }
    const at::Tensor dense = prepacked_to_dense(w.values, w.masks, w.block_offsets, w.N, w.K);
    if (int8) {
      // Exact integer dot products (fp64 holds them), then the kernel's own fp32 epilogue.
      const at::Tensor q = xq.narrow(1, 0, w.K).to(at::kDouble);
      const at::Tensor dots = at::matmul(q, dense.to(at::kDouble).t()) -
                              x_zero.to(at::kDouble).unsqueeze(1) * dense.to(at::kDouble).sum(1).unsqueeze(0);
      y = (x_scale.unsqueeze(1) * scale32.unsqueeze(0)) * dots.to(at::kFloat);
    } else {
      y = at::matmul(x2d.to(at::kBFloat16).to(at::kFloat), dense.to(at::kFloat).t());
    }
    if (bias32.defined()) y.add_(bias32);
    return y.to(x.scalar_type()).reshape(out_shape);
  }
  Problem p{nullptr,
            M,
            KC * C,
            w.N,
            KC,
            static_cast<const uint8_t*>(w.values.const_data_ptr()),
            w.masks.defined() ? w.masks.const_data_ptr<uint8_t>() : nullptr,
            w.masks.defined() ? w.block_offsets.const_data_ptr<int64_t>() : nullptr,
            int8 ? w.row_sums.const_data_ptr<int32_t>() : nullptr,
            int8 ? scale32.const_data_ptr<float>() : nullptr,
            int8 ? x_scale.const_data_ptr<float>() : nullptr,
            int8 ? x_zero.const_data_ptr<int32_t>() : nullptr,
            bias32.defined() ? bias32.const_data_ptr<float>() : nullptr,
            nullptr};
  if (isa == "amx" || (isa == "auto" && M >= kAmxRows && has_amx_kernels())) {
    // x as B tiles [M/16][KC][16 column pairs or quads][16 rows]: the VNNI order, rows padded with zeros.
    const int64_t Mp = ceil_div(M, kAmxTileRows) * kAmxTileRows, E = int8 ? 4 : 2;
    const at::Tensor xs = int8 ? at::constant_pad_nd(xq, {0, 0, 0, Mp - M}, 0)
                               : at::constant_pad_nd(x2d.to(at::kBFloat16), {0, KC * C - w.K, 0, Mp - M}, 0);
    const at::Tensor xt =
        xs.view({Mp / kAmxTileRows, kAmxTileRows, KC, 16, E}).permute({0, 2, 3, 1, 4}).contiguous();
    y = at::empty({M, w.N}, x2d.options().dtype(at::kFloat));
    p.x = static_cast<const uint8_t*>(xt.const_data_ptr());
    p.y = y.data_ptr<float>();
    TORCH_CHECK(amx_linear(p), op, ": the masks' popcounts disagree with block_offsets / values");
    return y.to(x.scalar_type()).reshape(out_shape);
  }
  if (!int8 && M >= kGemmRows) {  // prefill: unpack once, then torch's fp32 GEMM on bf16-rounded x
    const at::Tensor xf = at::constant_pad_nd(x2d.to(at::kBFloat16).to(at::kFloat), {0, KC * C - w.K}, 0);
    return gemm_avx512(p, NB, xf.contiguous()).to(x.scalar_type()).reshape(out_shape);
  }
  const at::Tensor xb = int8 ? xq
                             : at::constant_pad_nd(x2d.to(at::kBFloat16).to(at::kFloat), {0, KC * C - w.K}, 0)
                                   .view({M, KC, C / 2, 2})
                                   .transpose(2, 3)
                                   .contiguous();
  y = at::empty({M, w.N}, x2d.options().dtype(at::kFloat));
  p.x = static_cast<const uint8_t*>(xb.const_data_ptr());
  p.y = y.data_ptr<float>();
  run_avx512(p, int8, NB);
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace

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
                         const std::optional<at::Tensor>& bias, c10::string_view isa) {
  TORCH_CHECK(masks.defined() && block_offsets.defined(), "bitmap_linear: masks and block_offsets are required");
  return run_linear(x, {"bitmap_linear", values, masks, block_offsets, row_sums, out_features, in_features},
                    weight_scale, bias, isa);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_sums,
                        int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& weight_scale,
                        const std::optional<at::Tensor>& bias, c10::string_view isa) {
  return run_linear(x, {"dense_linear", values, at::Tensor(), at::Tensor(), row_sums, out_features, in_features},
                    weight_scale, bias, isa);
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) {
  m.impl("bitmap_linear", &bitmap_linear);
  m.impl("dense_linear", &dense_linear);
}

}  // namespace sparamx
