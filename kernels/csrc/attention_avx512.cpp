// AVX-512 path of decode attention (attention_walk.h's walk): a packed token's 32-element chunks are expand-loaded
// (vpexpandw) straight from its kept values by 32 bits of its mask, widened bf16 -> fp32 by a shift; the scores of
// the group's query heads take one FMA per head and 16 elements of a K row, the weighted sum one per head and 16
// elements of a V row, with the group's accumulators in registers. Needs dim % 32 == 0.
#include <cstring>

#include "attention_kernels.h"
#include "attention_walk.h"
// Last: see isa_intrinsics.h.
#include "isa_intrinsics.h"

namespace sparamx {
namespace {

constexpr int kMaxHeads = 8;  // query heads per register pass; larger groups take several passes

SPARAMX_AVX512_BEGIN

// 32 bf16 at v as fp32 into out[0..32).
inline void widen32(__m512i w, float* out) {
  _mm512_storeu_ps(out, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16)));
  _mm512_storeu_ps(out + 16,
                   _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16)));
}

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n); exactly 0 from x < -88.4,
// so exp(-inf) = 0.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        0x09);  // floor
  x = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  x = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

struct Avx512 {
  static bool rows(const KvStream& s, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, float* out) {
    const int64_t D = p.dim;
    for (int64_t t = t0; t < t0 + n; ++t, out += D) {
      if (t >= p.packed) {
        if (const float* f32 = f32_row(s, bh, t - p.packed, D)) {
          std::memcpy(out, f32, D * 4);
          continue;
        }
        const uint16_t* src = bf16_row(s, bh, t - p.packed, D);
        for (int64_t c = 0; c < D; c += 32) widen32(_mm512_loadu_si512(src + c), out + c);
        continue;
      }
      const uint8_t* mask = s.masks + (bh * s.cap_packed + t) * (D / 8);
      const uint16_t* v = s.values + (bh * s.cap_packed + t) * s.keep;
      int64_t used = 0;
      for (int64_t c = 0; c < D; c += 32) {
        uint32_t bits;
        std::memcpy(&bits, mask + c / 8, 4);
        const int count = __builtin_popcount(bits);
        if (used + count > s.keep) return false;
        __m512i raw;
        if (v + used + 32 <= s.values_end) {
          raw = _mm512_loadu_si512(v + used);
        } else {  // the buffer's last values: copy, never load past its end
          uint16_t tmp[32] = {};
          std::memcpy(tmp, v + used, count * 2);
          raw = _mm512_loadu_si512(tmp);
        }
        widen32(_mm512_maskz_expand_epi16(bits, raw), out + c);
        used += count;
      }
      if (used != s.keep) return false;
    }
    return true;
  }

  static void scores(const float* q, int64_t G, const float* rows, int64_t n, int64_t D, float* s) {
    for (int64_t i0 = 0; i0 < G; i0 += kMaxHeads) {
      const int64_t heads = std::min<int64_t>(kMaxHeads, G - i0);
      for (int64_t t = 0; t < n; ++t) {
        __m512 acc[kMaxHeads];
        for (int i = 0; i < kMaxHeads; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < D; c += 16) {
          const __m512 k = _mm512_loadu_ps(rows + t * D + c);
          for (int i = 0; i < heads; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (i0 + i) * D + c), k, acc[i]);
        }
        for (int i = 0; i < heads; ++i) s[(i0 + i) * kAttnBlock + t] = _mm512_reduce_add_ps(acc[i]);
      }
    }
  }

  static void exp_shifted(float* s, int64_t n, float shift) {
    float tmp[kAttnBlock + 16] = {};
    std::memcpy(tmp, s, n * 4);
    for (int64_t t = 0; t < n; t += 16) {
      _mm512_storeu_ps(tmp + t, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(tmp + t), _mm512_set1_ps(shift))));
    }
    std::memcpy(s, tmp, n * 4);
  }

  static void accumulate(const float* s, int64_t G, const float* rows, int64_t n, int64_t D, float* acc) {
    for (int64_t i0 = 0; i0 < G; i0 += kMaxHeads) {
      const int64_t heads = std::min<int64_t>(kMaxHeads, G - i0);
      for (int64_t c = 0; c < D; c += 16) {
        __m512 a[kMaxHeads];
        for (int i = 0; i < heads; ++i) a[i] = _mm512_loadu_ps(acc + (i0 + i) * D + c);
        for (int64_t t = 0; t < n; ++t) {
          const __m512 v = _mm512_loadu_ps(rows + t * D + c);
          for (int i = 0; i < heads; ++i) {
            a[i] = _mm512_fmadd_ps(_mm512_set1_ps(s[(i0 + i) * kAttnBlock + t]), v, a[i]);
          }
        }
        for (int i = 0; i < heads; ++i) _mm512_storeu_ps(acc + (i0 + i) * D + c, a[i]);
      }
    }
  }
};

SPARAMX_ISA_END

}  // namespace

bool avx512_attend(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out) {
  return attend_range<Avx512>(p, bh, t0, t1, out);
}

}  // namespace sparamx
