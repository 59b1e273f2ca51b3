// AVX-512 path of decode attention (attention_walk.h's walk), computing straight from the cache: a packed K tile's
// pair row or a packed V token's 32-element chunk is expand-loaded (vpexpandw) from its kept values by 32 mask bits,
// a dense token's chunk loaded -- never stored as fp32 rows. A bf16 model (bf16 query and dense tokens) runs on
// vdpbf16ps: K tiles' scores 16 tokens per instruction (one lane each), dense tokens' four at a time, the weighted
// sum on pairs of tokens with the softmax weights rounded to bf16 (Avx512Bf16); an fp32 query or fp32 dense tokens
// run in fp32, chunks widened in registers (Avx512). One load serves every query head of the group. Needs
// dim % 32 == 0.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

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

// The 32 bf16 elements of a packed token's chunk whose mask bits are `bits` and whose values for it start at v.
inline __m512i packed_bf16(const KvStream& s, const uint16_t* v, uint32_t bits) {
  // Near the buffer's end, a masked load of the values it holds: never a read past the end, and no call (a memcpy
  // would make the compiler keep the callers' accumulators in memory).
  const int count = __builtin_popcount(bits);
  __m512i kept = v + 32 <= s.values_end
                     ? _mm512_loadu_si512(v)
                     : _mm512_maskz_loadu_epi16(static_cast<__mmask32>(count == 32 ? ~0u : (1u << count) - 1), v);
  SPARAMX_IN_REGISTER(kept);
  return _mm512_maskz_expand_epi16(bits, kept);
}

inline Chunk packed_chunk(const KvStream& s, const uint16_t* v, uint32_t bits) {
  return widen(packed_bf16(s, v, bits));
}

// A packed token's mask words and where each chunk's values start; false unless it holds exactly `keep` bits.
inline bool chunk_offsets(const KvStream& s, int64_t bh, int64_t t, int64_t chunks, uint32_t* bits, int32_t* off) {
  const uint8_t* mask = packed_masks(s, bh, t, 32 * chunks);
  int32_t used = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    std::memcpy(&bits[c], mask + 4 * c, 4);
    off[c] = used;
    used += __builtin_popcount(bits[c]);
  }
  return used == s.keep;
}

// The set bits of each 32-bit lane: a nibble table (vpshufb), the four byte counts summed by vpdpbusd.
inline __m512i popcount32(__m512i v) {
  const __m512i table = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, nibble));
  const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_add_epi8(lo, hi), _mm512_set1_epi8(1));
}

// chunk_offsets for the packed tokens [t0, t0 + n) of a block at once: off[(t - t0) * chunks + c] is where chunk c
// of token t starts among its values (the popcounts of its earlier mask words); the mask words themselves are read
// where they lie. Sixteen words per step for 2 or 4 chunks (prefix sums within 64- or 128-bit lanes), chunk_offsets
// token by token otherwise. False unless every token holds exactly `keep` bits.
inline bool block_offsets(const KvStream& s, int64_t bh, int64_t t0, int64_t n, int64_t chunks, int32_t* off) {
  const uint8_t* masks = packed_masks(s, bh, t0, 32 * chunks);
  const int64_t words = n * chunks;
  if (chunks != 2 && chunks != 4) {
    uint32_t bits[kMaxChunks];
    for (int64_t t = 0; t < n; ++t) {
      if (!chunk_offsets(s, bh, t0 + t, chunks, bits, off + t * chunks)) return false;
    }
    return true;
  }
  const __m512i keep = _mm512_set1_epi32(static_cast<int>(s.keep));
  const __mmask16 last_word = chunks == 4 ? 0x8888 : 0xAAAA;  // the lane holding a token's total
  for (int64_t w = 0; w < words; w += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(words - w >= 16 ? 0xFFFF : (1u << (words - w)) - 1);
    const __m512i count = popcount32(_mm512_maskz_loadu_epi32(lanes, masks + 4 * w));
    __m512i upto = _mm512_add_epi32(count, _mm512_maskz_mov_epi32(chunks == 4 ? 0xEEEE : 0xAAAA,
                                                                   _mm512_bslli_epi128(count, 4)));
    if (chunks == 4) upto = _mm512_add_epi32(upto, _mm512_bslli_epi128(upto, 8));
    if (_mm512_mask_cmpneq_epi32_mask(static_cast<__mmask16>(last_word & lanes), upto, keep)) return false;
    _mm512_mask_storeu_epi32(off + w, lanes, _mm512_sub_epi32(upto, count));
  }
  return true;
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

// Same bits, other type: vdpbf16ps takes its bf16 pairs as __m512bh.
inline __m512bh as_bf16(__m512i x) {
  __m512bh out;
  std::memcpy(&out, &x, 64);
  return out;
}

// The set bits of a K tile's dim / 2 mask words (dim % 32 == 0: whole vectors of 16 words).
inline int64_t tile_popcount(const uint8_t* masks, int64_t D) {
  __m512i sum = _mm512_setzero_si512();
  for (int64_t w = 0; w < D / 2; w += 16) {
    sum = _mm512_add_epi32(sum, popcount32(_mm512_loadu_si512(masks + 4 * w)));
  }
  return _mm512_reduce_add_epi32(sum);
}

// Pair row r of a K tile as 16 tokens x 2 bf16 (lane j: token j's elements 2r, 2r + 1), from its mask word and the
// values at v (which it advances). Near: the values end within 32 elements of the buffer's, so the load is masked.
template <bool Near>
inline __m512i tile_row(const KvStream& k, const uint8_t* masks, int64_t r, const uint16_t*& v) {
  uint32_t word;
  std::memcpy(&word, masks + 4 * r, 4);
  const uint16_t* at = v;
  v += __builtin_popcount(word);
  if constexpr (Near) return packed_bf16(k, at, word);
  __m512i kept = _mm512_loadu_si512(at);
  SPARAMX_IN_REGISTER(kept);
  return _mm512_maskz_expand_epi16(word, kept);
}

// Where a run of K tiles from token t starts, how many tiles it takes (two while two remain before `split`), and
// whether its values end near the buffer's. False when a tile's masks do not hold kKTile x keep bits: checked before
// any value is loaded, so a bad mask never moves a load past the tile.
struct TileRun {
  const uint16_t* values;
  const uint8_t* masks;
  int tiles;
  bool near;

  bool start(const AttnProblem& p, int64_t bh, int64_t t, int64_t split) {
    const KvStream& k = p.k;
    values = packed_values(k, bh, t);
    masks = packed_masks(k, bh, t, p.dim);
    tiles = split - t >= 2 * kKTile ? 2 : 1;
    near = values + tiles * kKTile * k.keep + 32 > k.values_end;
    for (int j = 0; j < tiles; ++j) {
      if (tile_popcount(masks + j * 2 * p.dim, p.dim) != kKTile * k.keep) return false;
    }
    return true;
  }
};

// The bytes of stream s's tokens a block ahead of [t, t + tokens) -- packed ones' values, then masks, or dense rows
// -- asked for a few cache lines per step over the `steps` steps of the work on [t, t + tokens): spread out as
// prefetch_ahead is token by token (a burst of them at once overflows the miss buffers), in fewer instructions.
// Where those tokens are partly packed, partly dense or past the end, prefetch_ahead's per-token walk, all at once
// (once per range).
struct SpreadPrefetch {
  const char *values = nullptr, *masks = nullptr;
  int64_t value_lines = 0, lines = 0, per_step = 0;

  SpreadPrefetch(const KvStream& s, const AttnProblem& p, int64_t bh, int64_t t, int64_t tokens, int64_t steps) {
    const int64_t ahead = t + kAttnBlock;
    const auto line_of = [](const void* at) {
      return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(at) & ~uintptr_t{63});
    };
    const auto count = [](const char* line, const void* from, int64_t bytes) {
      return (static_cast<const char*>(from) + bytes - line + 63) / 64;
    };
    if (ahead + tokens <= p.packed) {
      const void* v = packed_values(s, bh, ahead);
      const void* m = packed_masks(s, bh, ahead, p.dim);
      values = line_of(v);
      masks = line_of(m);
      value_lines = count(values, v, tokens * s.keep * 2);
      lines = value_lines + count(masks, m, tokens * p.dim / 8);
    } else if (ahead >= p.packed && ahead + tokens <= p.packed + p.tail) {
      const int64_t size = s.tail_f32 ? 4 : 2;
      const void* rows = static_cast<const char*>(s.tail) + (bh * s.cap_tail + ahead - p.packed) * p.dim * size;
      values = line_of(rows);
      lines = value_lines = count(values, rows, tokens * p.dim * size);
    } else {
      for (int64_t j = 0; j < tokens; ++j) prefetch_ahead(s, p, bh, t + j);
      return;
    }
    per_step = (lines + steps - 1) / steps;
  }

  void step(int64_t k) const {
    for (int64_t line = k * per_step; line < (k + 1) * per_step && line < lines; ++line) {
      prefetch_l2(line < value_lines ? values + 64 * line : masks + 64 * (line - value_lines));
    }
  }
};

// fp32 scores of query heads [0, Heads) (scaled fp32 query, head i at q + i * D) for one K tile: each pair row's
// even and odd elements widened to fp32 (shift, mask) and multiplied by the broadcast query elements 2r and 2r + 1.
template <int Heads, bool Near>
inline void tile_scores_f32(const AttnProblem& p, int64_t bh, int64_t t, const float* q, const TileRun& run,
                            float* s) {
  const int64_t D = p.dim, R = D / 2;
  __m512 acc[Heads];
  for (int i = 0; i < Heads; ++i) acc[i] = _mm512_setzero_ps();
  const uint16_t* v = run.values;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const SpreadPrefetch ahead(p.k, p, bh, t, run.tiles * kKTile, R);
  for (int64_t r = 0; r < R; ++r) {
    ahead.step(r);
    const __m512i x = tile_row<Near>(p.k, run.masks, r, v);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    for (int i = 0; i < Heads; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + 2 * r]), even, acc[i]);
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + 2 * r + 1]), odd, acc[i]);
    }
  }
  for (int i = 0; i < Heads; ++i) _mm512_storeu_ps(s + i * kAttnBlock, acc[i]);
}

// s[i][t - t0] = q_i . K_t for query heads [i0, i0 + Heads) and tokens [t0, t0 + n): packed ones a tile at a time,
// then dense ones.
template <int Heads>
struct HeadScores {
  static bool run(int64_t i0, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, float* s) {
    const KvStream& k = p.k;
    const int64_t D = p.dim, split = std::clamp(p.packed, t0, t0 + n);
    const float* q = p.q + (bh * p.G + i0) * D;
    s += i0 * kAttnBlock - t0;
    for (int64_t t = t0; t < split; t += kKTile) {
      TileRun run;
      if (!run.start(p, bh, t, t + kKTile)) return false;
      if (run.near) {
        tile_scores_f32<Heads, true>(p, bh, t, q, run, s + t);
      } else {
        tile_scores_f32<Heads, false>(p, bh, t, q, run, s + t);
      }
    }
    for (int64_t t = split; t < t0 + n; ++t) {
      prefetch_ahead(k, p, bh, t);
      if (const float* row = f32_row(k, bh, t - p.packed, D)) {
        const auto chunk_of = [&](int64_t c) {
          return Chunk{_mm512_loadu_ps(row + 32 * c), _mm512_loadu_ps(row + 32 * c + 16)};
        };
        score_token<Heads>(q, D, chunk_of, s + t);
      } else {
        const uint16_t* row16 = bf16_row(k, bh, t - p.packed, D);
        score_token<Heads>(q, D, [&](int64_t c) { return widen(_mm512_loadu_si512(row16 + 32 * c)); }, s + t);
      }
    }
    return true;
  }
};

// Scores of query heads [i0, i0 + Heads) for four tokens, from their 16-lane sums acc[token][head]: one reduction
// tree (sum4) per head, times the softmax scale, into s[head * kAttnBlock + token] for the first m tokens.
template <int Heads>
inline void store_scores4(__m512 (&acc)[4][Heads], float scale, int64_t m, float* s) {
  const __m512i lanes_0_4_8_12 = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int i = 0; i < Heads; ++i) {
    const __m512 sums = sum4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
    const __m512 scores = _mm512_mul_ps(_mm512_permutexvar_ps(lanes_0_4_8_12, sums), _mm512_set1_ps(scale));
    if (m == 4) {
      _mm_storeu_ps(s + i * kAttnBlock, _mm512_castps512_ps128(scores));
    } else {
      _mm512_mask_storeu_ps(s + i * kAttnBlock, static_cast<__mmask16>((1u << m) - 1), scores);
    }
  }
}

// bf16 scores of query heads [0, Heads) (bf16 query, head i at q + i * D) for a run of Tiles K tiles: per pair row
// one load and expand per tile, then per head one vdpbf16ps per tile against the broadcast query pair -- 16 tokens'
// partial scores in the lanes, nothing to reduce. Two tiles at a time, so each broadcast serves both.
template <int Heads, int Tiles, bool Near>
inline void tile_scores_bf16(const AttnProblem& p, int64_t bh, int64_t t, const uint16_t* q, const TileRun& run,
                             float* s) {
  const int64_t D = p.dim, R = D / 2;
  __m512 acc[Tiles][Heads];
  const uint16_t* v[Tiles];
  for (int j = 0; j < Tiles; ++j) {
    v[j] = run.values + j * kKTile * p.k.keep;
    for (int i = 0; i < Heads; ++i) acc[j][i] = _mm512_setzero_ps();
  }
  const SpreadPrefetch ahead(p.k, p, bh, t, run.tiles * kKTile, R);
  for (int64_t r = 0; r < R; ++r) {
    ahead.step(r);
    __m512bh x[Tiles];
    for (int j = 0; j < Tiles; ++j) x[j] = as_bf16(tile_row<Near>(p.k, run.masks + j * 2 * D, r, v[j]));
    for (int i = 0; i < Heads; ++i) {
      uint32_t pair;
      std::memcpy(&pair, q + i * D + 2 * r, 4);
      const __m512bh qp = as_bf16(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int j = 0; j < Tiles; ++j) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], x[j], qp);
    }
  }
  for (int i = 0; i < Heads; ++i)
    for (int j = 0; j < Tiles; ++j)
      _mm512_storeu_ps(s + i * kAttnBlock + j * kKTile, _mm512_mul_ps(acc[j][i], _mm512_set1_ps(p.scale)));
}

// tile_scores_bf16 for the run's tile count and nearness as constants.
template <int Heads>
inline void tile_run_scores_bf16(const AttnProblem& p, int64_t bh, int64_t t, const uint16_t* q, const TileRun& run,
                                 float* s) {
  if (run.tiles == 2 && run.near) {
    tile_scores_bf16<Heads, 2, true>(p, bh, t, q, run, s);
  } else if (run.tiles == 2) {
    tile_scores_bf16<Heads, 2, false>(p, bh, t, q, run, s);
  } else if (run.near) {
    tile_scores_bf16<Heads, 1, true>(p, bh, t, q, run, s);
  } else {
    tile_scores_bf16<Heads, 1, false>(p, bh, t, q, run, s);
  }
}

// The same from the bf16 query (AttnProblem::q16) by vdpbf16ps, exact bf16 products summed in fp32: packed tokens
// by K tiles, dense ones four at a time, so that one reduction tree (sum4) turns four of a head's 16-lane sums into
// its four scores.
template <int Heads>
struct HeadScoresBf16 {
  static bool run(int64_t i0, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, float* s) {
    const KvStream& k = p.k;
    const int64_t D = p.dim, chunks = D / 32, split = std::clamp(p.packed, t0, t0 + n);
    const uint16_t* q = p.q16 + (bh * p.G + i0) * D;
    s += i0 * kAttnBlock - t0;
    TileRun run;
    for (int64_t t = t0; t < split; t += run.tiles * kKTile) {
      if (!run.start(p, bh, t, split)) return false;
      tile_run_scores_bf16<Heads>(p, bh, t, q, run, s + t);
    }
    for (int64_t t4 = split; t4 < t0 + n; t4 += 4) {
      const int64_t m = std::min<int64_t>(4, t0 + n - t4);
      const uint16_t* row[4];
      for (int64_t j = 0; j < m; ++j) {
        prefetch_ahead(k, p, bh, t4 + j);
        row[j] = bf16_row(k, bh, t4 + j - p.packed, D);
      }
      __m512 acc[4][Heads];
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < Heads; ++i) acc[j][i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {  // each query chunk loaded once for the four tokens
        __m512bh qc[Heads];
        for (int i = 0; i < Heads; ++i) qc[i] = as_bf16(_mm512_loadu_si512(q + i * D + 32 * c));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          if (j >= m) break;
          const __m512bh x = as_bf16(_mm512_loadu_si512(row[j] + 32 * c));
          for (int i = 0; i < Heads; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], qc[i], x);
        }
      }
      store_scores4<Heads>(acc, p.scale, m, s + t4);
    }
    return true;
  }
};

// acc_i += sum_t s[i][t - t0] * V_t for query heads [i0, i0 + Heads), chunk by chunk with the accumulators in
// registers over the block's tokens; bits / off: the packed tokens' masks and value offsets per chunk.
template <int Heads>
struct HeadAccumulate {
  static bool run(int64_t i0, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* s, float* acc,
                  const uint8_t* bits, const int32_t* off) {
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
      const uint16_t* values = packed_values(v, bh, t0);
      for (int64_t t = t0, j = c; t < split; ++t, j += chunks, values += v.keep) {
        uint32_t word;
        std::memcpy(&word, bits + 4 * j, 4);
        add(t, packed_chunk(v, values + off[j], word));
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

// The weighted sum by vdpbf16ps, two tokens per instruction: the chunks of tokens t and t + 1 interleaved element by
// element (vpunpck{l,h}wd, within 128-bit lanes), times the pair (p_t, p_t+1) of bf16 weights. The interleave leaves
// lane j of `lo` holding element 8 (j / 4) + j % 4 of the chunk and lane j of `hi` element 8 (j / 4) + 4 + j % 4;
// the accumulators are permuted into that order when loaded and back when stored. pairs: [G][kAttnBlock / 2];
// ahead: the next block's V, one step per pair of tokens and chunk.
template <int Heads>
struct HeadAccumulateBf16 {
  static bool run(int64_t i0, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const uint32_t* pairs,
                  float* acc, const uint8_t* bits, const int32_t* off, const SpreadPrefetch* ahead) {
    const KvStream& v = p.v;
    const int64_t D = p.dim, chunks = D / 32;
    const __m512i to_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i to_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const __m512i from_lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i from_hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const int64_t end = t0 + n, split = std::clamp(p.packed, t0, end);
    pairs += i0 * (kAttnBlock / 2) - t0 / 2;  // t0 is even: ranges start on block boundaries
    acc += i0 * D;
    const uint16_t* values = packed_values(v, bh, t0);
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 lo[Heads], hi[Heads];
      for (int i = 0; i < Heads; ++i) {
        const __m512 a = _mm512_loadu_ps(acc + i * D + 32 * c), b = _mm512_loadu_ps(acc + i * D + 32 * c + 16);
        lo[i] = _mm512_permutex2var_ps(a, to_lo, b);
        hi[i] = _mm512_permutex2var_ps(a, to_hi, b);
      }
      const auto add_pair = [&](int64_t t, __m512i x, __m512i y) {
        ahead->step((c * n + t - t0) / 2);
        const __m512bh xy_lo = as_bf16(_mm512_unpacklo_epi16(x, y)), xy_hi = as_bf16(_mm512_unpackhi_epi16(x, y));
        for (int i = 0; i < Heads; ++i) {
          const __m512bh w = as_bf16(_mm512_set1_epi32(static_cast<int>(pairs[i * (kAttnBlock / 2) + t / 2])));
          lo[i] = _mm512_dpbf16_ps(lo[i], w, xy_lo);
          hi[i] = _mm512_dpbf16_ps(hi[i], w, xy_hi);
        }
      };
      const auto packed = [&](int64_t t) {
        const int64_t j = (t - t0) * chunks + c;
        uint32_t word;
        std::memcpy(&word, bits + 4 * j, 4);
        return packed_bf16(v, values + (t - t0) * v.keep + off[j], word);
      };
      const auto dense = [&](int64_t t) {
        return t < end ? _mm512_loadu_si512(bf16_row(v, bh, t - p.packed, D) + 32 * c) : _mm512_setzero_si512();
      };
      int64_t t = t0;
      for (; t + 1 < split; t += 2) add_pair(t, packed(t), packed(t + 1));
      if (t < split) {  // the pair across the packed / dense boundary
        add_pair(t, packed(t), dense(t + 1));
        t += 2;
      }
      for (; t < end; t += 2) add_pair(t, dense(t), dense(t + 1));
      for (int i = 0; i < Heads; ++i) {
        _mm512_storeu_ps(acc + i * D + 32 * c, _mm512_permutex2var_ps(lo[i], from_lo, hi[i]));
        _mm512_storeu_ps(acc + i * D + 32 * c + 16, _mm512_permutex2var_ps(lo[i], from_hi, hi[i]));
      }
    }
    return true;
  }
};

// The packed V tokens' value offsets of a block (block_offsets); false on a bad mask.
inline bool block_value_offsets(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, int32_t* off) {
  return t0 >= p.packed || block_offsets(p.v, bh, t0, std::min(t0 + n, p.packed) - t0, p.dim / 32, off);
}

inline float block_max_f32(const float* s, int64_t n) {
  const __m512 none = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = none;
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - t)) - 1);
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(none, lanes, s + t));
  }
  return _mm512_reduce_max_ps(top);
}

// s[t] = exp(s[t] - shift) for t < n, rounded to bf16 with Bf16; returns their sum.
template <bool Bf16>
inline float exp_shifted_sum(float* s, int64_t n, float shift) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - t)) - 1);
    __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + t), _mm512_set1_ps(shift)));
    if constexpr (Bf16) {  // to nearest even; e is in [0, 1], so no inf or NaN to care for
      const __m512i bits = _mm512_castps_si512(e);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
      e = _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
    e = _mm512_maskz_mov_ps(lanes, e);
    _mm512_mask_storeu_ps(s + t, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// For an fp32 query or fp32 dense tokens: everything in fp32.
struct Avx512 {
  static bool scores(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float*, float* s, float*) {
    return for_head_groups<HeadScores>(p.G, p, bh, t0, n, s);
  }

  static bool accumulate(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* s, float* acc,
                         float*) {
    int32_t off[kAttnBlock * kMaxChunks];
    if (!block_value_offsets(p, bh, t0, n, off)) return false;
    SpreadPrefetch(p.v, p, bh, t0, n, 1).step(0);  // the next block's V, at once
    const uint8_t* bits = packed_masks(p.v, bh, t0, p.dim);
    return for_head_groups<HeadAccumulate>(p.G, p, bh, t0, n, s, acc, bits, +off);
  }

  static float block_max(const float* s, int64_t n) { return block_max_f32(s, n); }
  static float exp_shifted(float* s, int64_t n, float shift) { return exp_shifted_sum<false>(s, n, shift); }
};

// For a bf16 model: bf16 dot products. The softmax weights are rounded to bf16 (as torch's bf16 attention rounds
// them) when they are made, so the normaliser sums the very weights the weighted sum uses.
struct Avx512Bf16 {
  static bool scores(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float*, float* s, float*) {
    return for_head_groups<HeadScoresBf16, 4>(p.G, p, bh, t0, n, s);
  }

  static bool accumulate(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* s, float* acc,
                         float*) {
    int32_t off[kAttnBlock * kMaxChunks];
    if (!block_value_offsets(p, bh, t0, n, off)) return false;
    const uint8_t* bits = packed_masks(p.v, bh, t0, p.dim);
    // (p_t, p_t+1) as a bf16 pair (the high halves of the rounded fp32 weights), 32 tokens per step, 0 past the end.
    thread_local std::vector<uint32_t> pairs;
    pairs.resize(p.G * (kAttnBlock / 2));
    const __m512i high_halves = _mm512_setr_epi32(0x30001, 0x70005, 0xB0009, 0xF000D, 0x130011, 0x170015, 0x1B0019,
                                                  0x1F001D, 0x230021, 0x270025, 0x2B0029, 0x2F002D, 0x330031,
                                                  0x370035, 0x3B0039, 0x3F003D);
    for (int64_t h = 0; h < kAttnBlock; h += 32) {
      const int64_t left = std::max<int64_t>(0, n - h);
      const __mmask16 first = static_cast<__mmask16>((1u << std::min<int64_t>(16, left)) - 1);
      const __mmask16 second = static_cast<__mmask16>((1u << std::clamp<int64_t>(left - 16, 0, 16)) - 1);
      for (int64_t i = 0; i < p.G; ++i) {
        const __m512 a = _mm512_maskz_loadu_ps(first, s + i * kAttnBlock + h);
        const __m512 b = _mm512_maskz_loadu_ps(second, s + i * kAttnBlock + h + 16);
        _mm512_storeu_si512(pairs.data() + i * (kAttnBlock / 2) + h / 2,
                            _mm512_permutex2var_epi16(_mm512_castps_si512(a), high_halves, _mm512_castps_si512(b)));
      }
    }
    const SpreadPrefetch ahead(p.v, p, bh, t0, n, p.dim / 32 * ((n + 1) / 2));
    return for_head_groups<HeadAccumulateBf16>(p.G, p, bh, t0, n, pairs.data(), acc, bits, +off, &ahead);
  }

  static float block_max(const float* s, int64_t n) { return block_max_f32(s, n); }
  static float exp_shifted(float* s, int64_t n, float shift) { return exp_shifted_sum<true>(s, n, shift); }
};

SPARAMX_ISA_END

}  // namespace

bool avx512_attend(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out) {
  TORCH_INTERNAL_ASSERT(p.dim % 32 == 0 && p.dim / 32 <= kMaxChunks);
  return p.q16 ? attend_range<Avx512Bf16>(p, bh, t0, t1, out) : attend_range<Avx512>(p, bh, t0, t1, out);
}

}  // namespace sparamx
