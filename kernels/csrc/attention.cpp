// Decode attention over a layer's KV cache (attention_kernels.h's layout): one query token per sequence, all query
// heads of a KV group together, so each K/V byte is read once. Flash-decoding (Dao et al. 2023,
// https://crfm.stanford.edu/2023/10/12/flashdecoding.html): the tokens of each (batch, KV head) are split into
// ranges so that batch x heads x ranges keeps every thread busy; each range leaves a partial softmax (max, sum,
// weighted sum of V) and the partials are merged by their log-sum-exp. This file checks the arguments, picks the path
// (AVX-512 > AVX2 > reference, the same walk on each: attention_walk.h), splits, merges.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "attention_kernels.h"
#include "attention_walk.h"
#include "cpu_features.h"
#include "op_functions.h"

namespace sparamx {
namespace {

// Fewest tokens a work item gets when a (batch, KV head)'s tokens are split over threads.
constexpr int64_t kMinSplitTokens = 256;

// The reference path: the same walk in plain C++, for CPUs without AVX2 and as the paths' common yardstick.
struct Reference {
  static float widen(uint16_t bf16) {
    const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }

  // A K tile's kKTile tokens (from token t) as fp32 rows out[j * D + d]; false unless it holds kKTile x keep bits.
  static bool tile_rows(const KvStream& s, int64_t bh, int64_t t, int64_t D, float* out) {
    const uint8_t* mask = packed_masks(s, bh, t, D);
    const uint16_t* v = packed_values(s, bh, t);
    int64_t used = 0;
    for (int64_t r = 0; r < D / 2; ++r)
      for (int b = 0; b < 32; ++b) {
        const bool set = (mask[4 * r + b / 8] >> (b % 8)) & 1;
        if (set && used == kKTile * s.keep) return false;
        out[(b / 2) * D + 2 * r + b % 2] = set ? widen(v[used++]) : 0.0f;
      }
    return used == kKTile * s.keep;
  }

  // A packed V token as an fp32 row; false unless its mask holds `keep` bits.
  static bool token_row(const KvStream& s, int64_t bh, int64_t t, int64_t D, float* out) {
    const uint8_t* mask = packed_masks(s, bh, t, D);
    const uint16_t* v = packed_values(s, bh, t);
    int64_t used = 0;
    for (int64_t d = 0; d < D; ++d) {
      const bool set = (mask[d / 8] >> (d % 8)) & 1;
      if (set && used == s.keep) return false;
      out[d] = set ? widen(v[used++]) : 0.0f;
    }
    return used == s.keep;
  }

  static void bf16_row_f32(const uint16_t* src, int64_t D, float* out) {
    for (int64_t d = 0; d < D; ++d) out[d] = widen(src[d]);
  }

  static void row_scores(const float* q, int64_t G, const float* rows, int64_t n, int64_t D, float* s) {
    for (int64_t i = 0; i < G; ++i)
      for (int64_t t = 0; t < n; ++t) {
        float sum = 0.0f;
        for (int64_t d = 0; d < D; ++d) sum += q[i * D + d] * rows[t * D + d];
        s[i * kAttnBlock + t] = sum;
      }
  }

  static float block_max(const float* s, int64_t n) { return *std::max_element(s, s + n); }

  static float exp_shifted(float* s, int64_t n, float shift) {
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) sum += s[t] = std::exp(s[t] - shift);
    return sum;
  }

  static void row_accumulate(const float* s, int64_t G, const float* rows, int64_t n, int64_t D, float* acc) {
    for (int64_t i = 0; i < G; ++i)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < D; ++d) acc[i * D + d] += s[i * kAttnBlock + t] * rows[t * D + d];
  }
};

bool reference_attend(const AttnProblem& p, int64_t bh, int64_t t0, int64_t t1, const AttnPartial& out) {
  return attend_range<RowsFirst<Reference>>(p, bh, t0, t1, out);
}

using AttendFn = bool (*)(const AttnProblem&, int64_t, int64_t, int64_t, const AttnPartial&);

// isa as the linear ops take it; amx (tiles have nothing to do at one query row) runs the AVX-512 path it implies.
AttendFn choose_attend(c10::string_view isa, int64_t dim) {
  const std::string name(isa);
  const bool avx512_fits = dim % 32 == 0 && dim <= kAvx512MaxDim;
  if (name == "auto") {
    if (avx512_fits && has_path(KernelPath::kAvx512)) return &avx512_attend;
    return has_path(KernelPath::kAvx2) ? &avx2_attend : &reference_attend;
  }
  const KernelPath path = forced_path("decode_attention", name);
  if (path == KernelPath::kReference) return &reference_attend;
  if (path == KernelPath::kAvx2) return &avx2_attend;
  TORCH_CHECK(avx512_fits, "decode_attention: the avx512 path needs head_dim % 32 == 0 and <= ", kAvx512MaxDim,
              ", got ", dim);
  return &avx512_attend;
}

// One of K or V: values [B, H, cap, keep] bf16, masks [B, H, cap, dim / 8] uint8, tail [B, H, cap_tail, dim] bf16.
KvStream check_stream(const char* name, const at::Tensor& values, const at::Tensor& masks, const at::Tensor& tail,
                      int64_t B, int64_t H, int64_t D, int64_t packed, int64_t tail_len, bool tiled) {
  for (const at::Tensor* t : {&values, &masks, &tail}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 4 && t->size(0) == B && t->size(1) == H,
                "decode_attention: ", name, " tensors must be contiguous CPU [", B, ", ", H, ", tokens, ...], got ",
                t->sizes());
  }
  TORCH_CHECK(values.scalar_type() == at::kBFloat16, "decode_attention: ", name, "_values must be bfloat16");
  TORCH_CHECK(tail.scalar_type() == at::kBFloat16 || tail.scalar_type() == at::kFloat, "decode_attention: ", name,
              "_tail must be bfloat16 or float32, got ", tail.scalar_type());
  TORCH_CHECK(masks.scalar_type() == at::kByte && masks.size(3) == D / 8 && masks.size(2) == values.size(2),
              "decode_attention: ", name, "_masks must be uint8 [", B, ", ", H, ", ", values.size(2), ", ", D / 8,
              "], got ", masks.sizes());
  const int64_t keep = values.size(3);
  TORCH_CHECK(keep <= D, "decode_attention: ", name, "_values keeps ", keep, " of ", D, " elements per token");
  TORCH_CHECK(tail.size(3) == D, "decode_attention: ", name, "_tail must have head_dim ", D, ", got ", tail.size(3));
  TORCH_CHECK(0 <= packed && packed <= values.size(2) && 0 <= tail_len && tail_len <= tail.size(2),
              "decode_attention: ", packed, " packed and ", tail_len, " tail tokens do not fit ", name,
              "'s buffers of ", values.size(2), " and ", tail.size(2));
  const auto* v = reinterpret_cast<const uint16_t*>(values.const_data_ptr());
  return {v, v + values.numel(), masks.const_data_ptr<uint8_t>(), tail.const_data_ptr(),
          tail.scalar_type() == at::kFloat, tiled, keep, values.size(2), tail.size(2)};
}

// Work items per (batch, KV head): enough for ~4 per thread, each of at least kMinSplitTokens tokens (in blocks).
int64_t splits_per_head(int64_t BH, int64_t T) {
  const int64_t wanted = (4 * at::get_num_threads() + BH - 1) / BH;
  const int64_t most = std::max<int64_t>(1, T / kMinSplitTokens);
  return std::max<int64_t>(1, std::min(wanted, most));
}

// out[bh][i] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the S partials of bh, M = max_s m_s.
void merge_partials(const at::Tensor& m, const at::Tensor& l, const at::Tensor& acc, int64_t S, int64_t G, int64_t D,
                    float* out) {
  const float* mp = m.const_data_ptr<float>();
  const float* lp = l.const_data_ptr<float>();
  const float* ap = acc.const_data_ptr<float>();
  at::parallel_for(0, m.size(0) / S, 16, [&](int64_t b0, int64_t b1) {  // a few heads' merge: no thread wake-up
    for (int64_t bh = b0; bh < b1; ++bh)
      for (int64_t i = 0; i < G; ++i) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < S; ++s) top = std::max(top, mp[(bh * S + s) * G + i]);
        float* o = out + (bh * G + i) * D;
        std::fill(o, o + D, 0.0f);
        if (top == -std::numeric_limits<float>::infinity()) continue;  // nothing attended: zeros
        float total = 0.0f;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t at = (bh * S + s) * G + i;
          const float w = std::exp(mp[at] - top);
          total += w * lp[at];
          for (int64_t d = 0; d < D; ++d) o[d] += w * ap[at * D + d];
        }
        for (int64_t d = 0; d < D; ++d) o[d] /= total;
      }
  });
}

// q * scale in fp32, as (q.to(float) * scale) computes it, in one loop.
at::Tensor scaled_query(const at::Tensor& q, float scale) {
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  const int64_t n = q.numel();
  if (q.scalar_type() == at::kFloat) {
    const float* src = q.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
  } else {
    const c10::BFloat16* src = q.const_data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  }
  return out;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_values, const at::Tensor& k_masks,
                            const at::Tensor& k_tail, const at::Tensor& v_values, const at::Tensor& v_masks,
                            const at::Tensor& v_tail, int64_t packed, int64_t tail, const std::optional<at::Tensor>& valid,
                            double scale, c10::string_view isa) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3, "decode_attention: q must be a CPU [batch, heads, head_dim], got ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: q must be float32 or bfloat16, got ", q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), H = k_values.dim() == 4 ? k_values.size(1) : 0;
  TORCH_CHECK(D > 0 && D % 8 == 0, "decode_attention: head_dim must be a positive multiple of 8, got ", D);
  TORCH_CHECK(H > 0 && Hq % H == 0, "decode_attention: ", Hq, " query heads are not a multiple of ", H, " KV heads");
  TORCH_CHECK(std::isfinite(scale), "decode_attention: scale must be finite");
  TORCH_CHECK(packed % kKTile == 0, "decode_attention: packed K comes in tiles of ", kKTile, " tokens; ", packed,
              " packed tokens are not a whole number of them");
  const KvStream ks = check_stream("k", k_values, k_masks, k_tail, B, H, D, packed, tail, true);
  const KvStream vs = check_stream("v", v_values, v_masks, v_tail, B, H, D, packed, tail, false);
  TORCH_CHECK(k_tail.scalar_type() == v_tail.scalar_type(), "decode_attention: k_tail and v_tail must have one dtype");
  const int64_t T = packed + tail;
  TORCH_CHECK(T > 0, "decode_attention: the cache holds no tokens");
  at::Tensor valid_b;
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->sizes() == at::IntArrayRef({B, T}),
                "decode_attention: valid must be bool [", B, ", ", T, "], got ", valid->scalar_type(), " ",
                valid->sizes());
    valid_b = valid->contiguous();
  }
  const AttendFn attend = choose_attend(isa, D);
  const at::Tensor qs = scaled_query(q.contiguous(), static_cast<float>(scale));
  const bool bf16_model = q.scalar_type() == at::kBFloat16 && !ks.tail_f32;
  const at::Tensor q16 = bf16_model ? q.contiguous() : at::Tensor();
  const int64_t G = Hq / H, BH = B * H, S = splits_per_head(BH, T);
  const AttnProblem p{qs.const_data_ptr<float>(), ks, vs, H, G, D, packed, tail,
                      valid_b.defined() ? valid_b.const_data_ptr<bool>() : nullptr,
                      bf16_model ? reinterpret_cast<const uint16_t*>(q16.const_data_ptr()) : nullptr,
                      static_cast<float>(scale)};
  const at::TensorOptions f32 = qs.options();
  const at::Tensor m = at::empty({BH * S, G}, f32), l = at::empty({BH * S, G}, f32);
  const at::Tensor acc = at::empty({BH * S, G, D}, f32);
  const int64_t span = (T + S - 1) / S;
  const int64_t step = (span + kAttnBlock - 1) / kAttnBlock * kAttnBlock;  // ranges start on block boundaries
  std::atomic<bool> ok{true};
  at::parallel_for(0, BH * S, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t0 = std::min(T, (w % S) * step), t1 = std::min(T, t0 + step);
      const AttnPartial part{m.data_ptr<float>() + w * G, l.data_ptr<float>() + w * G, acc.data_ptr<float>() + w * G * D};
      if (!attend(p, w / S, t0, t1, part)) ok = false;
    }
  });
  TORCH_CHECK(ok.load(), "decode_attention: packed masks do not hold exactly as many set bits as the values they "
              "keep (", kKTile, " x ", ks.keep, " per K tile, ", vs.keep, " per V token)");
  at::Tensor out = at::empty({B, Hq, D}, f32);
  merge_partials(m, l, acc, S, G, D, out.data_ptr<float>());
  return to_dtype(out, q.scalar_type());
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) { m.impl("decode_attention", &decode_attention); }

}  // namespace sparamx
