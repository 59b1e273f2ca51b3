// AVX-512 path of the linear kernels, any M: per block of kRows output rows and per chunk of columns, one 512-bit
// register of weights per row -- expand-loaded (vpexpandw / vpexpandb) from the row's next popcount(mask) values for
// the bitmap format, a plain load for dense -- then for each of up to 4 activation rows one load and kRows dot
// products (two FMAs of bf16 widened to fp32, or vpdpbusd of uint8 activations with int8 weights into int32 lanes).
// The walk over blocks and activation rows is block_walk.h's.
#include <cstring>
#include <type_traits>

#include "block_walk.h"
#include "linear_kernels.h"
#include "packed_format.h"
// Last: see isa_intrinsics.h.
#include "isa_intrinsics.h"

namespace sparamx {
namespace {

// Software prefetch distance into the weight stream, in bytes. Measured on 2 cores streaming from DRAM: without it
// the bitmap kernels reached ~62% of the read bandwidth, at 2 KiB ~80%, at 4 KiB ~85-90% (eval/results/kernels.md).
constexpr int64_t kPrefetchBytes = 4096;

SPARAMX_AVX512_BEGIN

// Rows [b*kRows, b*kRows + kRows) of y for activation rows [m0, m0 + MB). A bitmap block whose masks ask for more
// values than the block holds, or fewer, returns false before reading past it.
template <bool Int8, bool Sparse, int MB>
bool block_rows(const Problem& p, int64_t b, int64_t m0) {
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
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < rows; ++r) {
      if constexpr (Int8) store_output(p, m0 + i, b * kRows + r, static_cast<int32_t>(_mm512_reduce_add_epi32(acc[i][r])));
      else store_output(p, m0 + i, b * kRows + r, _mm512_reduce_add_ps(acc[i][r]));
    }
  return true;
}

// bf16 block b as fp32 rows [b*kRows, b*kRows + kRows) of `out` (row stride Kp floats), for the prefill GEMM.
template <bool Sparse>
bool unpack_rows(const Problem& p, int64_t b, float* out) {
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

// Block b as rows [b*kRows, b*kRows + kRows) of `out` in the values' own type (int8, or bf16 bits), row stride Kp
// values, zeros where no weight is kept: for the prefill GEMMs on torch's int8 and bf16 kernels.
template <bool Int8, bool Sparse>
bool unpack_raw_rows(const Problem& p, int64_t b, uint8_t* out) {
  constexpr int64_t E = Int8 ? 1 : 2, MaskBytes = Int8 ? 8 : 4;  // bytes per value; mask bytes per row and chunk
  const uint8_t* v = Sparse ? p.values + p.block_offsets[b] * E : p.values + b * p.KC * kRows * 64;
  const uint8_t* end = Sparse ? p.values + p.block_offsets[b + 1] * E : nullptr;
  const uint8_t* mk = Sparse ? p.masks + b * p.KC * kRows * MaskBytes : nullptr;
  for (int64_t c = 0; c < p.KC; ++c) {
    for (int r = 0; r < kRows; ++r) {
      __m512i w;
      if constexpr (Sparse) {
        uint64_t bits = 0;
        std::memcpy(&bits, mk + r * MaskBytes, MaskBytes);
        const int64_t count = __builtin_popcountll(bits);
        if (v + count * E > end) return false;
        const __m512i raw = _mm512_loadu_si512(v);  // values end with a register of slack
        if constexpr (Int8) w = _mm512_maskz_expand_epi8(bits, raw);
        else w = _mm512_maskz_expand_epi16(static_cast<__mmask32>(bits), raw);
        v += count * E;
      } else {
        w = _mm512_loadu_si512(v);
        v += 64;
      }
      _mm512_storeu_si512(out + ((b * kRows + r) * p.Kp + c * (64 / E)) * E, w);
    }
    if constexpr (Sparse) mk += kRows * MaskBytes;
  }
  return !Sparse || v == end;
}

SPARAMX_ISA_END

struct Avx512 {
  template <bool Int8, bool Sparse, int MB>
  static bool block(const Problem& p, int64_t b, int64_t m0) {
    return block_rows<Int8, Sparse, MB>(p, b, m0);
  }
  template <bool Sparse>
  static bool unpack(const Problem& p, int64_t b, float* out) {
    return unpack_rows<Sparse>(p, b, out);
  }
};

}  // namespace

bool avx512_blocks(const Problem& p, int64_t b0, int64_t b1) { return walk_blocks<Avx512>(p, b0, b1); }

bool avx512_unpack_block(const Problem& p, int64_t b, float* out) { return unpack_block<Avx512>(p, b, out); }

bool avx512_unpack_raw_block(const Problem& p, int64_t b, void* out) {
  uint8_t* o = static_cast<uint8_t*>(out);
  if (p.row_sums) return p.masks ? unpack_raw_rows<true, true>(p, b, o) : unpack_raw_rows<true, false>(p, b, o);
  return p.masks ? unpack_raw_rows<false, true>(p, b, o) : unpack_raw_rows<false, false>(p, b, o);
}

}  // namespace sparamx
