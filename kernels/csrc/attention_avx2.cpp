// AVX2 path of decode attention (attention_walk.h's walk), for CPUs without AVX-512: packed K tiles and V tokens are
// expanded 8 elements per mask byte by avx2_expand.h's shuffle table (one vpshufb places 8 bf16 in the high halves
// of 8 fp32 lanes, so it also widens), each byte's values starting at the popcount of the mask bits before it.
// Scores and the weighted sum as the AVX-512 path's, 8 elements a step. Needs dim % 8 == 0.
#include <algorithm>
#include <cstring>
#include <limits>

#include "attention_kernels.h"
#include "attention_walk.h"
#include "avx2_expand.h"

// Last: no inline function of a header may be compiled for AVX2 (see isa_intrinsics.h).
#include <immintrin.h>

namespace sparamx {
namespace {

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")

#include "avx2_inline.h"  // NOLINT(build/include): inside the region on purpose

// exp(x) for x <= 0 (attention_kernels.h's kExp*); exp(-inf) = 0.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// s[i][t] = q_i . row_t for query heads [i0, i0 + Heads): one load of each K row chunk serves every head.
template <int Heads>
struct HeadScores {
  static bool run(int64_t i0, const float* q, const float* rows, int64_t n, int64_t D, float* s) {
    for (int64_t t = 0; t < n; ++t) {
      __m256 acc[Heads];
      for (int i = 0; i < Heads; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t c = 0; c < D; c += 8) {
        const __m256 k = _mm256_loadu_ps(rows + t * D + c);
        for (int i = 0; i < Heads; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (i0 + i) * D + c), k, acc[i]);
      }
      for (int i = 0; i < Heads; ++i) s[(i0 + i) * kAttnBlock + t] = hsum(acc[i]);
    }
    return true;
  }
};

// acc_i += sum_t s[i][t] * row_t for query heads [i0, i0 + Heads), 8 elements at a time.
template <int Heads>
struct HeadAccumulate {
  static bool run(int64_t i0, const float* s, const float* rows, int64_t n, int64_t D, float* acc) {
    for (int64_t c = 0; c < D; c += 8) {
      __m256 a[Heads];
      for (int i = 0; i < Heads; ++i) a[i] = _mm256_loadu_ps(acc + (i0 + i) * D + c);
      for (int64_t t = 0; t < n; ++t) {
        const __m256 v = _mm256_loadu_ps(rows + t * D + c);
        for (int i = 0; i < Heads; ++i) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + (i0 + i) * kAttnBlock + t), v, a[i]);
      }
      for (int i = 0; i < Heads; ++i) _mm256_storeu_ps(acc + (i0 + i) * D + c, a[i]);
    }
    return true;
  }
};

// The 8 elements of one mask byte `bits` as fp32, from the kept values at v on (never a load past the buffer's end).
inline __m256 expand8(const KvStream& s, const uint16_t* v, unsigned bits) {
  __m128i raw;
  if (v + 8 <= s.values_end) {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  } else {  // the buffer's last values: copy, never load past its end
    uint16_t tmp[8] = {};
    std::memcpy(tmp, v, std::min<int64_t>(8, s.values_end - v) * 2);
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  const __m256i shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandTables.bf16[bits]));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), shuffle));
}

struct Avx2 {
  // A K tile's kKTile tokens (from token t) as fp32 rows out[j * D + d]: mask byte k of pair row r covers tokens
  // 4k .. 4k + 3, so its 8 expanded lanes are their (2r, 2r + 1) pairs, stored 64 bits each.
  static bool tile_rows(const KvStream& s, int64_t bh, int64_t t, int64_t D, float* out) {
    const uint8_t* mask = packed_masks(s, bh, t, D);
    const uint16_t* v = packed_values(s, bh, t);
    int64_t used = 0;
    for (int64_t r = 0; r < D / 2; ++r)
      for (int64_t k = 0; k < 4; ++k) {
        const unsigned bits = mask[4 * r + k];
        const int count = _mm_popcnt_u32(bits);
        if (used + count > kKTile * s.keep) return false;
        const __m256 x = expand8(s, v + used, bits);
        float* at = out + 4 * k * D + 2 * r;
        _mm_storel_pi(reinterpret_cast<__m64*>(at), _mm256_castps256_ps128(x));
        _mm_storeh_pi(reinterpret_cast<__m64*>(at + D), _mm256_castps256_ps128(x));
        _mm_storel_pi(reinterpret_cast<__m64*>(at + 2 * D), _mm256_extractf128_ps(x, 1));
        _mm_storeh_pi(reinterpret_cast<__m64*>(at + 3 * D), _mm256_extractf128_ps(x, 1));
        used += count;
      }
    return used == kKTile * s.keep;
  }

  // A packed V token as an fp32 row, 8 elements per mask byte.
  static bool token_row(const KvStream& s, int64_t bh, int64_t t, int64_t D, float* out) {
    const uint8_t* mask = packed_masks(s, bh, t, D);
    const uint16_t* v = packed_values(s, bh, t);
    int64_t used = 0;
    for (int64_t c = 0; c < D; c += 8) {
      const unsigned bits = mask[c / 8];
      const int count = _mm_popcnt_u32(bits);
      if (used + count > s.keep) return false;
      _mm256_storeu_ps(out + c, expand8(s, v + used, bits));
      used += count;
    }
    return used == s.keep;
  }

  // A dense bf16 token's row as fp32.
  static void bf16_row_f32(const uint16_t* src, int64_t D, float* out) {
    for (int64_t c = 0; c < D; c += 8) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
      _mm256_storeu_ps(out + c, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
    }
  }

  static void row_scores(const float* q, int64_t G, const float* rows, int64_t n, int64_t D, float* s) {
    for_head_groups<HeadScores>(G, q, rows, n, D, s);
  }

  static float block_max(const float* s, int64_t n) {
    __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + t));
    float lanes[8], out = -std::numeric_limits<float>::infinity();
    _mm256_storeu_ps(lanes, top);
    for (float x : lanes) out = std::max(out, x);
    for (; t < n; ++t) out = std::max(out, s[t]);
    return out;
  }

  static float exp_shifted(float* s, int64_t n, float shift) {
    float tmp[kAttnBlock + 8];
    std::fill(tmp, tmp + kAttnBlock + 8, -std::numeric_limits<float>::infinity());  // past n: exp gives 0
    std::memcpy(tmp, s, n * 4);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; t += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tmp + t), _mm256_set1_ps(shift)));
      _mm256_storeu_ps(tmp + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    std::memcpy(s, tmp, n * 4);
    return hsum(sum);
  }

  static void row_accumulate(const float* s, int64_t G, const float* rows, int64_t n, int64_t D, float* acc) {
    for_head_groups<HeadAccumulate>(G, s, rows, n, D, acc);
  }
};

#pragma GCC pop_options

}  // namespace

bool avx2_attend(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out) {
  return attend_range<RowsFirst<Avx2>>(p, bh, t0, t1, out);
}

}  // namespace sparamx
