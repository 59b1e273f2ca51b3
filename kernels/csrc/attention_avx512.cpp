// AVX-512 path of decode attention (attention_walk.h's walk), computing straight from the cache: a token's 32-element
// chunk is expand-loaded (vpexpandw) from its kept values by 32 bits of its mask, or loaded when dense, and widened
// bf16 -> fp32 in registers -- never stored as fp32 rows. Scores: per token, one chunk load serves the FMAs of every
// query head of the group. Weighted sum: chunk by chunk, the group's accumulators stay in registers over the block's
// tokens, each chunk's value offset taken from a per-token prefix popcount. Needs dim % 32 == 0.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "attention_kernels.h"
#include "attention_walk.h"
// Last: see isa_intrinsics.h.
#include "isa_intrinsics.h"

namespace sparamx {
namespace {

constexpr int kMaxChunks = kAvx512MaxDim / 32;

SPARAMX_AVX512_BEGIN

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n); exactly 0 from x < -88.4,
// exp(x) for x <= 0 (attention_kernels.h's kExp*); exp(-inf) = 0.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)), 0x09);
  x = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Hi)));
  x = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Lo)));
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

// Elements [c, c + 32) of one token, as fp32 in two registers (lo: c..c+15, hi: c+16..c+31).
struct Chunk {
  __m512 lo, hi;
};

inline Chunk widen(__m512i w) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16)),
          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16))};
}

// The chunk of a packed token whose 32 mask bits are `bits` and whose values for it start at v.
inline Chunk packed_chunk(const KvStream& s, const uint16_t* v, uint32_t bits) {
  if (v + 32 <= s.values_end) return widen(_mm512_maskz_expand_epi16(bits, _mm512_loadu_si512(v)));
  uint16_t tmp[32] = {};  // the buffer's last values: copy, never load past its end
  std::memcpy(tmp, v, __builtin_popcount(bits) * 2);
  return widen(_mm512_maskz_expand_epi16(bits, _mm512_loadu_si512(tmp)));
}

// A packed token's mask words and where each chunk's values start; false unless it holds exactly `keep` bits.
inline bool chunk_offsets(const KvStream& s, int64_t bh, int64_t t, int64_t chunks, uint32_t* bits, int64_t* off) {
  const uint8_t* mask = s.masks + (bh * s.cap_packed + t) * chunks * 4;
  int64_t used = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    std::memcpy(&bits[c], mask + 4 * c, 4);
    off[c] = used;
    used += __builtin_popcount(bits[c]);
  }
  return used == s.keep;
}

// Sums of 4 vectors, at lanes 0, 4, 8 and 12: 256-bit halves added pairwise, then 128-bit quarters, then within
// each quarter -- 13 instructions where 4 separate reduce-adds take about 32, and scores need one per head and token.
inline __m512 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  x = _mm512_add_ps(x, _mm512_shuffle_ps(x, x, 0x4E));
  return _mm512_add_ps(x, _mm512_shuffle_ps(x, x, 0xB1));
}

// q_i . x for query heads i < Heads (q_i at q + i * D) and the token whose chunks chunk_of(c) gives; sum i goes to
// s[i * kAttnBlock].
template <int Heads, typename ChunkOf>
inline void score_token(const float* q, int64_t D, ChunkOf chunk_of, float* s) {
  __m512 acc[Heads];
  for (int i = 0; i < Heads; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D / 32; ++c) {
    const Chunk x = chunk_of(c);
    for (int i = 0; i < Heads; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * D + 32 * c), x.lo, acc[i]);
      acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * D + 32 * c + 16), x.hi, acc[i]);
    }
  }
  int i = 0;
  for (; i + 4 <= Heads; i += 4) {
    float sums[16];
    _mm512_storeu_ps(sums, sum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
    for (int j = 0; j < 4; ++j) s[(i + j) * kAttnBlock] = sums[4 * j];
  }
  for (; i < Heads; ++i) s[i * kAttnBlock] = _mm512_reduce_add_ps(acc[i]);
}

// s[i][t - t0] = q_i . K_t for query heads [i0, i0 + Heads) and tokens [t0, t0 + n): packed ones, then dense ones.
template <int Heads>
struct HeadScores {
  static bool run(int64_t i0, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* q, float* s) {
    const KvStream& k = p.k;
    const int64_t D = p.dim, split = std::clamp(p.packed, t0, t0 + n);
    q += i0 * D;
    s += i0 * kAttnBlock - t0;
    for (int64_t t = t0; t < split; ++t) {
      if (t + kAttnBlock < p.packed + p.tail) prefetch_token(k, bh, t + kAttnBlock, p.packed, D);
      uint32_t bits[kMaxChunks];
      int64_t off[kMaxChunks];
      if (!chunk_offsets(k, bh, t, D / 32, bits, off)) return false;
      const uint16_t* v = k.values + (bh * k.cap_packed + t) * k.keep;
      score_token<Heads>(q, D, [&](int64_t c) { return packed_chunk(k, v + off[c], bits[c]); }, s + t);
    }
    for (int64_t t = split; t < t0 + n; ++t) {
      if (t + kAttnBlock < p.packed + p.tail) prefetch_token(k, bh, t + kAttnBlock, p.packed, D);
      if (const float* row = f32_row(k, bh, t - p.packed, D)) {
        score_token<Heads>(q, D, [&](int64_t c) { return Chunk{_mm512_loadu_ps(row + 32 * c), _mm512_loadu_ps(row + 32 * c + 16)}; }, s + t);
      } else {
        const uint16_t* row16 = bf16_row(k, bh, t - p.packed, D);
        score_token<Heads>(q, D, [&](int64_t c) { return widen(_mm512_loadu_si512(row16 + 32 * c)); }, s + t);
      }
    }
    return true;
  }
};

// acc_i += sum_t s[i][t - t0] * V_t for query heads [i0, i0 + Heads), chunk by chunk with the accumulators in
// registers over the block's tokens; bits / off: the packed tokens' masks and value offsets per chunk.
template <int Heads>
struct HeadAccumulate {
  static bool run(int64_t i0, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* s, float* acc,
                  const uint32_t* bits, const int64_t* off) {
    const KvStream& v = p.v;
    const int64_t D = p.dim, chunks = D / 32, split = std::clamp(p.packed, t0, t0 + n);
    s += i0 * kAttnBlock - t0;
    acc += i0 * D;
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 lo[Heads], hi[Heads];
      for (int i = 0; i < Heads; ++i) {
        lo[i] = _mm512_loadu_ps(acc + i * D + 32 * c);
        hi[i] = _mm512_loadu_ps(acc + i * D + 32 * c + 16);
      }
      const auto add = [&](int64_t t, const Chunk& x) {
        for (int i = 0; i < Heads; ++i) {
          const __m512 w = _mm512_set1_ps(s[i * kAttnBlock + t]);
          lo[i] = _mm512_fmadd_ps(w, x.lo, lo[i]);
          hi[i] = _mm512_fmadd_ps(w, x.hi, hi[i]);
        }
      };
      const uint16_t* values = v.values + (bh * v.cap_packed + t0) * v.keep;
      for (int64_t t = t0, j = c; t < split; ++t, j += chunks, values += v.keep) {
        add(t, packed_chunk(v, values + off[j], bits[j]));
      }
      if (split < t0 + n) {
        if (const float* row = f32_row(v, bh, split - p.packed, D)) {
          for (int64_t t = split; t < t0 + n; ++t, row += D) {
            add(t, Chunk{_mm512_loadu_ps(row + 32 * c), _mm512_loadu_ps(row + 32 * c + 16)});
          }
        } else {
          const uint16_t* row16 = bf16_row(v, bh, split - p.packed, D);
          for (int64_t t = split; t < t0 + n; ++t, row16 += D) add(t, widen(_mm512_loadu_si512(row16 + 32 * c)));
        }
      }
      for (int i = 0; i < Heads; ++i) {
        _mm512_storeu_ps(acc + i * D + 32 * c, lo[i]);
        _mm512_storeu_ps(acc + i * D + 32 * c + 16, hi[i]);
      }
    }
    return true;
  }
};

struct Avx512 {
  static bool scores(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* q, float* s, float*) {
    return for_head_groups<HeadScores>(p.G, p, bh, t0, n, q, s);
  }

  static bool accumulate(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* s, float* acc,
                         float*) {
    const int64_t chunks = p.dim / 32;
    uint32_t bits[kAttnBlock * kMaxChunks];
    int64_t off[kAttnBlock * kMaxChunks];
    for (int64_t t = t0; t < t0 + n; ++t) {
      if (t + kAttnBlock < p.packed + p.tail) prefetch_token(p.v, bh, t + kAttnBlock, p.packed, p.dim);
      const int64_t j = (t - t0) * chunks;
      if (t < p.packed && !chunk_offsets(p.v, bh, t, chunks, bits + j, off + j)) return false;
    }
    return for_head_groups<HeadAccumulate>(p.G, p, bh, t0, n, s, acc, +bits, +off);
  }

  static void exp_shifted(float* s, int64_t n, float shift) {
    float tmp[kAttnBlock + 16] = {};
    std::memcpy(tmp, s, n * 4);
    for (int64_t t = 0; t < n; t += 16) {
      _mm512_storeu_ps(tmp + t, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(tmp + t), _mm512_set1_ps(shift))));
    }
    std::memcpy(s, tmp, n * 4);
  }
};

SPARAMX_ISA_END

}  // namespace

bool avx512_attend(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out) {
  TORCH_INTERNAL_ASSERT(p.dim % 32 == 0 && p.dim / 32 <= kMaxChunks);
  return attend_range<Avx512>(p, bh, t0, t1, out);
}

}  // namespace sparamx
