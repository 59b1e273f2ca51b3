#pragma once
// The walk every decode-attention path shares: a bh's tokens kAttnBlock at a time -- K rows expanded to fp32, the
// scores of all G query heads of the group (so each K byte is read once), online softmax, then the V rows and the
// weighted sum -- into an AttnPartial (attention_kernels.h). A path provides, for its instruction set:
//   Isa::rows(stream, p, bh, t0, n, out)   n tokens from t0 as fp32 rows [n][dim]; false on a bad mask
//   Isa::scores(q, G, rows, n, dim, s)     s[i][t] = q_i . row_t (s has kAttnBlock columns)
//   Isa::exp_shifted(s, n, shift)          s[t] = exp(s[t] - shift); exp(-inf) = 0
//   Isa::accumulate(s, G, rows, n, dim, acc)  acc_i += sum_t s[i][t] * row_t
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_kernels.h"

namespace sparamx {

template <typename Isa>
bool attend_range(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = p.G, D = p.dim;
  std::vector<float> rows(kAttnBlock * D), s(G * kAttnBlock);
  std::fill(out.m, out.m + G, kNegInf);
  std::fill(out.l, out.l + G, 0.0f);
  std::fill(out.acc, out.acc + G * D, 0.0f);
  const float* q = p.q + bh * G * D;
  const bool* valid = p.valid ? p.valid + (bh / p.H) * (p.packed + p.tail) : nullptr;
  for (int64_t tb = t0; tb < t1; tb += kAttnBlock) {
    const int64_t n = std::min(kAttnBlock, t1 - tb);
    if (!Isa::rows(p.k, p, bh, tb, n, rows.data())) return false;
    Isa::scores(q, G, rows.data(), n, D, s.data());
    for (int64_t i = 0; i < G; ++i) {
      float* si = s.data() + i * kAttnBlock;
      if (valid) {
        for (int64_t t = 0; t < n; ++t) si[t] = valid[tb + t] ? si[t] : kNegInf;
      }
      const float top = *std::max_element(si, si + n);
      if (top == kNegInf) {  // every token of the block masked for this head: it adds nothing
        std::fill(si, si + n, 0.0f);
        continue;
      }
      const float m = std::max(out.m[i], top);
      const float rescale = std::exp(out.m[i] - m);  // 0 while nothing was attended yet
      Isa::exp_shifted(si, n, m);
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) sum += si[t];
      out.l[i] = out.l[i] * rescale + sum;
      if (rescale != 1.0f) {
        for (int64_t d = 0; d < D; ++d) out.acc[i * D + d] *= rescale;
      }
      out.m[i] = m;
    }
    if (!Isa::rows(p.v, p, bh, tb, n, rows.data())) return false;
    Isa::accumulate(s.data(), G, rows.data(), n, D, out.acc);
  }
  return true;
}

}  // namespace sparamx
