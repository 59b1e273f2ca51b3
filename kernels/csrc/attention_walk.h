#pragma once
// The walk every decode-attention path shares: a bh's tokens kAttnBlock at a time -- the scores of all G query heads
// of the group against the block's K (so each K byte is read once), online softmax, then the weighted sum of the
// block's V -- into an AttnPartial (attention_kernels.h). A path provides, for its instruction set:
//   Isa::scores(p, bh, t0, n, q, s, scratch)      s[i][t] = q_i . K_t for tokens [t0, t0 + n) (s: kAttnBlock columns)
//   Isa::accumulate(p, bh, t0, n, s, acc, scratch)  acc_i += sum_t s[i][t] * V_t
//   Isa::block_max(s, n)                            the largest of s[0, n)
//   Isa::exp_shifted(s, n, shift)                   s[t] = exp(s[t] - shift), exp(-inf) = 0; returns the sum
// the first two false on a packed V token (K tile) whose mask does not hold `keep` (kKTile x `keep`) bits; scratch:
// kRowsBlock x dim floats.
// A path that expands rows to fp32 first gets the first two from RowsFirst below.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_kernels.h"

namespace sparamx {

// Query heads per register pass of a path's scores / accumulate; larger groups take several passes.
constexpr int kMaxHeads = 8;

// Kernel<Heads>::run(i0, args...) for the query heads [i0, i0 + Heads) of a group, with Heads = count <= Most.
template <template <int> class Kernel, int Most, typename... Args>
bool run_heads(int64_t count, int64_t i0, Args... args) {
  if constexpr (Most > 1) {
    if (count < Most) return run_heads<Kernel, Most - 1>(count, i0, args...);
  }
  return Kernel<Most>::run(i0, args...);
}

// Kernel<Heads>::run(i0, args...) over a group of G query heads, up to Most (kMaxHeads) at a time: with the head
// count a constant, a path's per-head accumulator arrays are registers, not memory. False when a run is (a bad mask).
template <template <int> class Kernel, int Most = kMaxHeads, typename... Args>
bool for_head_groups(int64_t G, Args... args) {
  bool ok = true;
  for (int64_t i0 = 0; i0 < G && ok; i0 += Most) {
    ok = run_heads<Kernel, Most>(std::min<int64_t>(Most, G - i0), i0, args...);
  }
  return ok;
}

// scores and accumulate for a path that expands a block's K or V rows to fp32 first (reference, AVX2) and then
// computes on them. Rows provides the expansion of a K tile, a packed V token and a dense bf16 row --
// tile_rows(stream, bh, t, dim, out), token_row(stream, bh, t, dim, out) (both false on a bad mask) and
// bf16_row_f32(src, dim, out) -- and row_scores(q, G, rows, n, dim, s), row_accumulate(s, G, rows, n, dim, acc),
// block_max, exp_shifted.
template <typename Rows>
struct RowsFirst {
  // Tokens [t0, t0 + n) of stream s as fp32 rows out[(t - t0) * dim + d]; false on a bad mask.
  static bool rows(const KvStream& s, const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, float* out) {
    const int64_t D = p.dim, split = std::clamp(p.packed, t0, t0 + n), step = s.tiled ? kKTile : 1;
    for (int64_t t = t0; t < split; t += step, out += step * D) {  // a block holds whole tiles (packed % kKTile == 0)
      for (int64_t j = 0; j < step; ++j) prefetch_ahead(s, p, bh, t + j);
      if (!(s.tiled ? Rows::tile_rows(s, bh, t, D, out) : Rows::token_row(s, bh, t, D, out))) return false;
    }
    for (int64_t t = split; t < t0 + n; ++t, out += D) {
      prefetch_ahead(s, p, bh, t);
      if (const float* f32 = f32_row(s, bh, t - p.packed, D)) {
        std::memcpy(out, f32, D * 4);
      } else {
        Rows::bf16_row_f32(bf16_row(s, bh, t - p.packed, D), D, out);
      }
    }
    return true;
  }

  static bool scores(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* q, float* s,
                     float* scratch) {
    for (int64_t h = 0; h < n; h += kRowsBlock) {  // kRowsBlock rows at a time: whole K tiles
      const int64_t m = std::min(kRowsBlock, n - h);
      if (!rows(p.k, p, bh, t0 + h, m, scratch)) return false;
      Rows::row_scores(q, p.G, scratch, m, p.dim, s + h);
    }
    return true;
  }
  static bool accumulate(const AttnProblem& p, int64_t bh, int64_t t0, int64_t n, const float* s, float* acc,
                         float* scratch) {
    for (int64_t h = 0; h < n; h += kRowsBlock) {
      const int64_t m = std::min(kRowsBlock, n - h);
      if (!rows(p.v, p, bh, t0 + h, m, scratch)) return false;
      Rows::row_accumulate(s + h, p.G, scratch, m, p.dim, acc);
    }
    return true;
  }
  static float block_max(const float* s, int64_t n) { return Rows::block_max(s, n); }
  static float exp_shifted(float* s, int64_t n, float shift) { return Rows::exp_shifted(s, n, shift); }
};

// The online softmax of a block, in three passes over the G heads -- maxima, exps, then the running sums and rescaled
// accumulators -- so that the heads' exp chains (latency-bound, a few vectors each) overlap instead of running one
// after the other. top / sum: G floats of scratch.
template <typename Isa>
void block_softmax(float* s, int64_t G, int64_t n, const bool* valid, const AttnPartial& out, int64_t D, float* top,
                   float* sum) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < G; ++i) {
    float* si = s + i * kAttnBlock;
    if (valid) {
      for (int64_t t = 0; t < n; ++t) si[t] = valid[t] ? si[t] : kNegInf;
    }
    top[i] = Isa::block_max(si, n);
  }
  for (int64_t i = 0; i < G; ++i) {
    float* si = s + i * kAttnBlock;
    if (top[i] == kNegInf) {  // every token of the block masked for this head: it adds nothing
      std::fill(si, si + n, 0.0f);
      continue;
    }
    top[i] = std::max(out.m[i], top[i]);
    sum[i] = Isa::exp_shifted(si, n, top[i]);
  }
  for (int64_t i = 0; i < G; ++i) {
    if (top[i] == kNegInf) continue;
    const float rescale = top[i] == out.m[i] ? 1.0f : std::exp(out.m[i] - top[i]);  // 0 while nothing was attended
    out.l[i] = out.l[i] * rescale + sum[i];
    if (rescale != 1.0f) {
      for (int64_t d = 0; d < D; ++d) out.acc[i * D + d] *= rescale;
    }
    out.m[i] = top[i];
  }
}

template <typename Isa>
bool attend_range(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out) {
  const int64_t G = p.G, D = p.dim;
  std::vector<float> scratch(kRowsBlock * D), s(G * kAttnBlock), top(G), sum(G);
  std::fill(out.m, out.m + G, -std::numeric_limits<float>::infinity());
  std::fill(out.l, out.l + G, 0.0f);
  std::fill(out.acc, out.acc + G * D, 0.0f);
  const float* q = p.q + bh * G * D;
  const bool* valid = p.valid ? p.valid + (bh / p.H) * (p.packed + p.tail) : nullptr;
  for (int64_t tb = t0; tb < t1; tb += kAttnBlock) {
    const int64_t n = std::min(kAttnBlock, t1 - tb);
    if (!Isa::scores(p, bh, tb, n, q, s.data(), scratch.data())) return false;
    block_softmax<Isa>(s.data(), G, n, valid ? valid + tb : nullptr, out, D, top.data(), sum.data());
    if (!Isa::accumulate(p, bh, tb, n, s.data(), out.acc, scratch.data())) return false;
  }
  return true;
}

}  // namespace sparamx
