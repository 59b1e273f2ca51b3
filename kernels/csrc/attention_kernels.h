#pragma once
// What attention.cpp (checks, dispatch, the split over threads, the merge) hands the decode-attention paths:
// attention_avx512.cpp, attention_avx2.cpp and the reference path in attention.cpp.
//
// The cache of one layer, per (batch, KV head) pair "bh": first `packed` tokens pruned per token to `keep` of `dim`
// values, then `tail` dense tokens (bf16, or fp32 for an fp32 model). K and V each have their own keep; every buffer
// has room for more tokens than it holds. A packed V token is a dim-bit mask (bit b of byte k = element 8k + b) and
// its kept values in element order. Packed K comes in tiles of kKTile tokens (below).
#include <cstdint>

namespace sparamx {

// A packed K tile: kKTile tokens in the bytes of kKTile token rows of the values and masks buffers, dim pairs major.
// Per pair row r (elements 2r, 2r + 1) a 32-bit mask word whose bit 2j + e is set when token j keeps element 2r + e;
// then the kept values of row 0, of row 1, ..., each row's in bit order. So one expand of a row gives 16 tokens x one
// dim pair, and one bf16 dot product against the query's pair adds that pair's share to 16 scores, one per lane:
// no reduction across lanes (V needs none either way, and keeps the per-token layout). `packed` is a whole number
// of tiles; pipeline/kv_sparsity.py writes the layout from the size the extension reports (kv_tile).
constexpr int64_t kKTile = 16;

struct KvStream {
  const uint16_t* values;      // bf16 [BH][cap_packed][keep]
  const uint16_t* values_end;  // one past the last allocated value: a SIMD load near it must not read past it
  const uint8_t* masks;        // [BH][cap_packed][dim / 8]
  const void* tail;            // [BH][cap_tail][dim], bf16 or (tail_f32) fp32
  bool tail_f32;
  bool tiled;                  // packed tokens in K tiles (K), or token by token (V)
  int64_t keep, cap_packed, cap_tail;
};

struct AttnProblem {
  const float* q;      // [B][H][G][dim]: the G query heads of each KV head, already times the softmax scale
  KvStream k, v;
  int64_t H, G, dim, packed, tail;
  const bool* valid;   // [B][packed + tail], false: the token is not attended (padding); null: all are
  // A bf16 model's query as it came, not scaled (bf16 [B][H][G][dim]), and the scale; null for an fp32 query or fp32
  // dense tokens. A path with bf16 dot products takes it: q . K exactly as bf16 products summed in fp32, then scaled.
  const uint16_t* q16;
  float scale;
};

// One work item's share: tokens [t0, t1) of one bh, as flash-decoding's partial softmax -- per query head the
// running max m, the sum l of exp(score - m), and acc = sum of exp(score - m) * v (not yet divided by l).
struct AttnPartial {
  float* m;    // [G]
  float* l;    // [G]
  float* acc;  // [G][dim]
};

// The AVX-512 path takes head vectors of 32-element chunks, up to this many elements.
constexpr int64_t kAvx512MaxDim = 256;

// Cephes' expf, the paths' vector exp for x <= 0: x = n ln2 + r (ln2 in two parts, for precision), exp(r) as
// 1 + r + r^2 (p0 r^5 + p1 r^4 + ... + p5), times 2^n; from x < kExpMin the 2^n is 0, so exp(-inf) = 0.
constexpr float kExpMin = -88.3762626647949f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// Tokens per step of the walk (attention_walk.h), and how far ahead it prefetches: per-block costs (the softmax, the
// accumulators' loads and stores) are spread over 64 tokens. Paths that expand rows to fp32 first do so kRowsBlock
// tokens at a time, so that a part's K rows, then its V rows, stay in L1.
constexpr int64_t kAttnBlock = 64;
constexpr int64_t kRowsBlock = 32;

// Where packed token t's values and mask start (for K, t the first token of a tile: the tile's).
inline const uint16_t* packed_values(const KvStream& s, int64_t bh, int64_t t) {
  return s.values + (bh * s.cap_packed + t) * s.keep;
}

inline const uint8_t* packed_masks(const KvStream& s, int64_t bh, int64_t t, int64_t dim) {
  return s.masks + (bh * s.cap_packed + t) * (dim / 8);
}

// A dense token's row, fp32 as it is stored: no conversion to make (null when the tail is bf16).
inline const float* f32_row(const KvStream& s, int64_t bh, int64_t t, int64_t dim) {
  return s.tail_f32 ? static_cast<const float*>(s.tail) + (bh * s.cap_tail + t) * dim : nullptr;
}

// A dense bf16 token's row.
inline const uint16_t* bf16_row(const KvStream& s, int64_t bh, int64_t t, int64_t dim) {
  return static_cast<const uint16_t*>(s.tail) + (bh * s.cap_tail + t) * dim;
}

// Ask for the bytes of token t + kAttnBlock of stream s (its values and mask, or its dense row) ahead of use: the walk
// reads a block of K rows, then of V rows, so the hardware prefetchers see two interleaved streams per thread and
// fall short of the read bandwidth without this. Into L2 (prefetcht1), not L1: a block ahead in L1 overflows the
// core's outstanding-miss slots, and on the AVX-512 EPYC measured prefetcht0 read ~14 GB/s where prefetcht1 reads
// ~22 (two threads, 8K-token cache); nearer distances or further ones did no better.
// asm, not __builtin_prefetch: GCC 12 deletes loops of builtin prefetches, and whole functions of them, as code
// without effect.
inline void prefetch_l2(const void* at) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(at))); }

inline void prefetch_ahead(const KvStream& s, const AttnProblem& p, int64_t bh, int64_t t) {
  t += kAttnBlock;
  if (t >= p.packed + p.tail) return;
  const char* at;
  int64_t bytes;
  if (t < p.packed) {
    prefetch_l2(packed_masks(s, bh, t, p.dim));
    at = reinterpret_cast<const char*>(packed_values(s, bh, t));
    bytes = s.keep * 2;
  } else {
    const int64_t size = s.tail_f32 ? 4 : 2;
    at = static_cast<const char*>(s.tail) + (bh * s.cap_tail + t - p.packed) * p.dim * size;
    bytes = p.dim * size;
  }
  for (int64_t off = 0; off < bytes; off += 64) prefetch_l2(at + off);
}

// False when a packed token's mask (a K tile's masks) does not hold exactly `keep` (kKTile x `keep`) set bits.
bool avx512_attend(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out);
bool avx2_attend(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out);

}  // namespace sparamx
