// AVX2 path of the linear kernels (AVX2, FMA, BMI2; no AVX-512), any M, on the AVX-512 path's prepacked layout.
//
// Bitmap expansion without vpexpand: each mask byte covers 8 columns, and a 256-entry table (avx2_expand.h) holds, per
// mask byte, the byte shuffle that moves the row's next popcount(byte) values into those columns. Where each
// byte's values start is the popcount of the mask bits below it (independent popcounts, not a chain). bf16: 8 values
// (16 bytes, broadcast to both 128-bit lanes) go by one vpshufb straight into the high halves of 8 fp32 lanes, so the
// shuffle also widens. int8: two mask bytes give 16 values,
// sign-extended to int16 and multiplied with the int16-widened uint8 activations by vpmaddwd into int32 lanes: two
// products of at most 255 * 128 per lane and step, so it cannot saturate (vpmaddubsw adds two u8 * s8 products into
// int16 and would: 2 * 255 * 127 > 32767). Rows outer, steps inner, so only one output row's accumulators (one per
// activation row, up to 4) are live: 16 ymm registers suffice. The walk over blocks and activation rows is
// block_walk.h's.
#include <algorithm>
#include <cstring>

#include "avx2_expand.h"
#include "block_walk.h"
#include "linear_kernels.h"
#include "packed_format.h"

namespace sparamx {
namespace {

constexpr int64_t kPrefetchBytes = 4096;  // as the AVX-512 path's (linear_avx512.cpp)

}  // namespace

const ExpandTables kExpandTables;

}  // namespace sparamx

// Last: no inline function of a header may be compiled for AVX2 (see isa_intrinsics.h).
#include <immintrin.h>

namespace sparamx {
namespace {

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")

#include "avx2_inline.h"  // NOLINT(build/include): inside the region on purpose

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}

// 8 bf16 columns as fp32: expanded by mask byte `bits` from v, or loaded when dense.
template <bool Sparse>
inline __m256 bf16x8(const uint8_t* v, unsigned bits) {
  if constexpr (Sparse) {
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    return _mm256_castsi256_ps(
        _mm256_shuffle_epi8(raw, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandTables.bf16[bits]))));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

// 8 int8 columns, expanded by mask byte j of `bits` from v, in the low 8 bytes. The byte's table row is found by
// one shift and one and (rows are 16 bytes): this runs once per 8 weights, so scalar work counts.
inline __m128i int8x8(const uint8_t* v, uint64_t bits, int j) {
  const uint64_t row = (j == 0 ? bits << 4 : bits >> (8 * j - 4)) & 0xFF0;
  return _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v)),
                          _mm_load_si128(reinterpret_cast<const __m128i*>(&kExpandTables.int8[0][0] + row)));
}

// Where each mask byte's values start in a row's run of values, for the 4 (bf16) or 8 (int8) bytes of a chunk's
// mask: independent popcounts of the mask's low bytes, so no load waits on the one before.
template <int Bytes>
inline void byte_offsets(uint64_t bits, int64_t* offsets) {
  offsets[0] = 0;
  for (int j = 1; j < Bytes; ++j) offsets[j] = _mm_popcnt_u64(_bzhi_u64(bits, 8 * j));
}

// Rows [b*kRows, b*kRows + kRows) of y for activation rows [m0, m0 + MB). Each chunk holds, per row, C columns:
// kSteps steps of 8 (bf16) or 16 (int8) columns. A bitmap block whose masks ask for more values than the block
// holds, or fewer, returns false before reading past it.
template <bool Int8, bool Sparse, int MB>
bool block_rows(const Problem& p, int64_t b, int64_t m0) {
  using Acc = std::conditional_t<Int8, __m256i, __m256>;
  constexpr int MaskBytes = Int8 ? 8 : 4;
  constexpr int64_t C = Int8 ? 64 : 32, E = Int8 ? 1 : 2, Step = Int8 ? 16 : 8;
  constexpr int64_t XBytes = Int8 ? 2 : 4;  // int16 or fp32 activations
  Acc acc[MB][kRows];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRows; ++r) {
      if constexpr (Int8) acc[i][r] = _mm256_setzero_si256();
      else acc[i][r] = _mm256_setzero_ps();
    }
  const uint8_t* v = Sparse ? p.values + p.block_offsets[b] * E : p.values + b * p.KC * kRows * C * E;
  const uint8_t* end = Sparse ? p.values + p.block_offsets[b + 1] * E : nullptr;
  const uint8_t* mk = Sparse ? p.masks + b * p.KC * kRows * MaskBytes : nullptr;
  const uint8_t* x = p.x + m0 * p.Kp * XBytes;
  for (int64_t c = 0; c < p.KC; ++c) {
    uint64_t bits[kRows] = {};  // dense: unused
    const uint8_t* row[kRows];
    if constexpr (Sparse) {
      const uint8_t* next = v;
      for (int r = 0; r < kRows; ++r) {
        // Whole-width copies: 4 bytes into a zeroed 8-byte word would stall on store forwarding.
        if constexpr (Int8) {
          std::memcpy(&bits[r], mk + r * MaskBytes, 8);
        } else {
          uint32_t b32;
          std::memcpy(&b32, mk + r * MaskBytes, 4);
          bits[r] = b32;
        }
        row[r] = next;
        next += _mm_popcnt_u64(bits[r]) * E;
      }
      if (next > end) return false;
      mk += kRows * MaskBytes;
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mk) + kPrefetchBytes / 4, _MM_HINT_T0);
      v = next;
    } else {
      for (int r = 0; r < kRows; ++r) {
        row[r] = v + r * C * E;
        _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes + r * 64, _MM_HINT_T0);
      }
      v += kRows * C * E;
    }
    const uint8_t* xc = x + c * C * XBytes;
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      int64_t off[MaskBytes];
      if constexpr (Sparse) byte_offsets<MaskBytes>(bits[r], off);
#pragma GCC unroll 4
      for (int64_t s = 0; s < C / Step; ++s) {
        const uint8_t* xs = xc + s * Step * XBytes;
        if constexpr (Int8) {
          __m256i w;
          if constexpr (Sparse) {
            const __m128i lo = int8x8(row[r] + off[2 * s], bits[r], 2 * s);
            const __m128i hi = int8x8(row[r] + off[2 * s + 1], bits[r], 2 * s + 1);
            w = _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(lo, hi));
          } else {
            w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + 16 * s)));
          }
          for (int i = 0; i < MB; ++i) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + i * p.Kp * XBytes));
            acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(xv, w));
          }
        } else {
          const __m256 w = Sparse ? bf16x8<true>(row[r] + 2 * off[s], (bits[r] >> (8 * s)) & 0xFF)
                                  : bf16x8<false>(row[r] + 16 * s, 0);
          for (int i = 0; i < MB; ++i) {
            const __m256 xv = _mm256_loadu_ps(reinterpret_cast<const float*>(xs + i * p.Kp * XBytes));
            acc[i][r] = _mm256_fmadd_ps(w, xv, acc[i][r]);
          }
        }
      }
    }
  }
  if (Sparse && v != end) return false;
  const int64_t rows = std::min(kRows, p.N - b * kRows);
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < rows; ++r) {
      if constexpr (Int8) store_output(p, m0 + i, b * kRows + r, static_cast<int32_t>(hsum(acc[i][r])));
      else store_output(p, m0 + i, b * kRows + r, hsum(acc[i][r]));
    }
  return true;
}

template <bool Sparse>
bool unpack_rows(const Problem& p, int64_t b, float* out) {
  const uint8_t* v = Sparse ? p.values + p.block_offsets[b] * 2 : p.values + b * p.KC * kRows * 64;
  const uint8_t* end = Sparse ? p.values + p.block_offsets[b + 1] * 2 : nullptr;
  const uint8_t* mk = Sparse ? p.masks + b * p.KC * kRows * 4 : nullptr;
  for (int64_t c = 0; c < p.KC; ++c) {
    for (int r = 0; r < kRows; ++r) {
      uint32_t bits = 0;
      if constexpr (Sparse) {
        std::memcpy(&bits, mk + r * 4, 4);
        if (v + _mm_popcnt_u32(bits) * 2 > end) return false;
      }
      float* dst = out + (b * kRows + r) * p.Kp + c * 32;
      int64_t off[4] = {0, 8, 16, 24};
      if constexpr (Sparse) byte_offsets<4>(bits, off);
      for (int s = 0; s < 4; ++s) _mm256_storeu_ps(dst + 8 * s, bf16x8<Sparse>(v + 2 * off[s], (bits >> (8 * s)) & 0xFF));
      v += Sparse ? 2 * _mm_popcnt_u32(bits) : 64;
    }
    if constexpr (Sparse) mk += kRows * 4;
  }
  return !Sparse || v == end;
}

#pragma GCC pop_options

struct Avx2 {
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

bool avx2_blocks(const Problem& p, int64_t b0, int64_t b1) { return walk_blocks<Avx2>(p, b0, b1); }

bool avx2_unpack_block(const Problem& p, int64_t b, float* out) { return unpack_block<Avx2>(p, b, out); }

}  // namespace sparamx
