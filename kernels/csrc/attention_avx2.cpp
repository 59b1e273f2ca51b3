// AVX2 path of decode attention (attention_walk.h's walk), for CPUs without AVX-512: a packed token is expanded 8
// elements per mask byte by avx2_expand.h's shuffle table (one vpshufb places 8 bf16 in the high halves of 8 fp32
// lanes, so it also widens), each byte's values starting at the popcount of the mask bits below it. Scores and the
// weighted sum as the AVX-512 path's, 8 elements a step. Needs dim % 8 == 0.
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

struct Avx2 {
  static bool rows(const KvStream& s, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, float* out) {
    const int64_t D = p.dim;
    for (int64_t t = t0; t < t0 + n; ++t, out += D) {
      prefetch_ahead(s, p, bh, t);
      if (t >= p.packed) {
        if (const float* f32 = f32_row(s, bh, t - p.packed, D)) {
          std::memcpy(out, f32, D * 4);
          continue;
        }
        const uint16_t* src = bf16_row(s, bh, t - p.packed, D);
        for (int64_t c = 0; c < D; c += 8) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
          _mm256_storeu_ps(out + c, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
        }
        continue;
      }
      const uint8_t* mask = s.masks + (bh * s.cap_packed + t) * (D / 8);
      const uint16_t* v = s.values + (bh * s.cap_packed + t) * s.keep;
      int64_t used = 0;
      for (int64_t c = 0; c < D; c += 8) {
        const unsigned bits = mask[c / 8];
        const int count = _mm_popcnt_u32(bits);
        if (used + count > s.keep) return false;
        __m128i raw;
        if (v + used + 8 <= s.values_end) {
          raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + used));
        } else {  // the buffer's last values: copy, never load past its end
          uint16_t tmp[8] = {};
          std::memcpy(tmp, v + used, count * 2);
          raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
        }
        const __m256i shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandTables.bf16[bits]));
        _mm256_storeu_ps(out + c, _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), shuffle)));
        used += count;
      }
      if (used != s.keep) return false;
    }
    return true;
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
