// One Llama decoder layer for one new token per sequence, in one op call: RMSNorm, q/k/v, RoPE, the token's K/V
// written into the layer's cache, decode attention over the cache, o_proj and the residual, RMSNorm, gate/up,
// SiLU * up, down_proj and the residual. The linears and the attention are our ops' C++ functions, called directly;
// between them every step rounds as transformers' LlamaDecoderLayer does in the model's dtype (the same ops, or loops
// that round each product and sum to that dtype as torch does), so the step gives the same numbers as the
// module-by-module path: what it removes is the ~100 Python module calls and aten ops around the kernels of every
// layer and token. Ordered by the weights list: the layer's two norms, then each linear as six slots (values, masks,
// block_offsets, row_sums, weight_scale, bias; masks null for dense weights) in the order q/k/v (one fused linear, or
// three), o, gate/up (one fused linear, or two), down; its shapes entry gives (out, in, x_symmetric) per linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "op_functions.h"

namespace sparamx {
namespace {

constexpr int64_t kSlots = 6;  // per linear: values, masks, block_offsets, row_sums, weight_scale, bias
constexpr int64_t kShapes = 3;  // per linear: out, in, x_symmetric
constexpr const char* kOp = "decode_layer";

struct Linear {
  at::Tensor values, masks, block_offsets, row_sums;
  std::optional<at::Tensor> scale, bias;
  int64_t N, K;
  bool x_symmetric;

  at::Tensor operator()(const at::Tensor& x, c10::string_view isa) const {
    if (masks.defined()) {
      return bitmap_linear(x, values, masks, block_offsets, row_sums, N, K, scale, bias, isa, x_symmetric);
    }
    return dense_linear(x, values, row_sums, N, K, scale, bias, isa, x_symmetric);
  }
};

struct LayerWeights {
  std::vector<int64_t> heads;  // query heads, KV heads, head_dim
  at::Tensor input_norm, post_norm;
  std::vector<Linear> qkv, o, gate_up, down;
};

at::Tensor required(const std::vector<std::optional<at::Tensor>>& slots, size_t i, const char* what) {
  TORCH_CHECK(slots[i].has_value() && slots[i]->defined(), kOp, ": weights[", i, "] (", what, ") is missing");
  return *slots[i];
}

// The weights list and its shapes ([n_qkv, n_gate_up, then (out, in, x_symmetric) per linear]) as the layer's parts,
// with every linear's shape checked against the heads and the hidden size (the linear ops check each tensor's own
// layout).
LayerWeights parse_weights(const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef shapes, int64_t Hd,
                           at::ScalarType dtype, int64_t Hq, int64_t Hkv, int64_t D) {
  TORCH_CHECK(shapes.size() >= 2, kOp, ": shapes must start with the q/k/v and gate/up linear counts");
  const int64_t n_qkv = shapes[0], n_gu = shapes[1], L = n_qkv + n_gu + 2;
  TORCH_CHECK((n_qkv == 1 || n_qkv == 3) && (n_gu == 1 || n_gu == 2), kOp,
              ": q/k/v come as 1 or 3 linears and gate/up as 1 or 2, got ", n_qkv, " and ", n_gu);
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 + kShapes * L &&
                  static_cast<int64_t>(weights.size()) == 2 + kSlots * L,
              kOp, ": ", L, " linears need ", 2 + kShapes * L, " shapes and ", 2 + kSlots * L, " weight slots, got ",
              shapes.size(), " and ", weights.size());
  const std::vector<std::optional<at::Tensor>> slots = weights.vec();
  LayerWeights w{{Hq, Hkv, D}, required(slots, 0, "input norm"), required(slots, 1, "post-attention norm")};
  for (const at::Tensor* norm : {&w.input_norm, &w.post_norm}) {
    TORCH_CHECK(norm->dim() == 1 && norm->size(0) == Hd && norm->scalar_type() == dtype && norm->is_contiguous(),
                kOp, ": norm weights must be contiguous ", dtype, " [", Hd, "], got ", norm->scalar_type(), " ",
                norm->sizes());
  }
  for (int64_t i = 0; i < L; ++i) {
    const size_t s = 2 + kSlots * i;
    auto get = [&](size_t j) { return slots[s + j].has_value() ? *slots[s + j] : at::Tensor(); };
    Linear lin{required(slots, s, "values"), get(1), get(2), required(slots, s + 3, "row_sums"),
               slots[s + 4], slots[s + 5], shapes[2 + kShapes * i], shapes[3 + kShapes * i],
               shapes[4 + kShapes * i] != 0};
    auto& group = i < n_qkv ? w.qkv : i == n_qkv ? w.o : i < L - 1 ? w.gate_up : w.down;
    group.push_back(std::move(lin));
  }
  const int64_t I = w.down[0].K;
  std::vector<int64_t> qkv_rows = n_qkv == 1 ? std::vector<int64_t>{(Hq + 2 * Hkv) * D}
                                             : std::vector<int64_t>{Hq * D, Hkv * D, Hkv * D};
  for (int64_t i = 0; i < n_qkv; ++i) {
    TORCH_CHECK(w.qkv[i].N == qkv_rows[i] && w.qkv[i].K == Hd, kOp, ": q/k/v linear ", i, " must be [",
                qkv_rows[i], ", ", Hd, "], got [", w.qkv[i].N, ", ", w.qkv[i].K, "]");
  }
  TORCH_CHECK(w.o[0].N == Hd && w.o[0].K == Hq * D, kOp, ": o_proj must be [", Hd, ", ", Hq * D, "]");
  for (const Linear& l : w.gate_up) {
    TORCH_CHECK(l.N == 2 * I / n_gu && l.K == Hd, kOp, ": gate/up linears must be [", 2 * I / n_gu, ", ", Hd, "]");
  }
  TORCH_CHECK(w.down[0].N == Hd, kOp, ": down_proj must have ", Hd, " outputs");
  return w;
}

// transformers' LlamaRMSNorm, rounding as its ops do: the fp32 mean of squares by torch's own reduction (at::mean, so
// its summation order), then rsqrt, back to the model's dtype T and times the weight, in one loop.
template <typename T>
at::Tensor rms_norm(const at::Tensor& h, const at::Tensor& weight, double eps) {
  const int64_t B = h.size(0), Hd = h.size(1);
  const T* hp = h.const_data_ptr<T>();
  at::Tensor squares = at::empty({B, Hd}, h.options().dtype(at::kFloat));
  float* sq = squares.data_ptr<float>();
  for (int64_t i = 0; i < B * Hd; ++i) sq[i] = static_cast<float>(hp[i]) * static_cast<float>(hp[i]);
  const at::Tensor variance = at::mean(squares, -1);
  const float* var = variance.const_data_ptr<float>();
  const T* wp = weight.const_data_ptr<T>();
  at::Tensor out = at::empty_like(h);
  T* op = out.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    const float inv = 1.0f / std::sqrt(var[b] + static_cast<float>(eps));
    for (int64_t k = 0; k < Hd; ++k) {
      const T normed = static_cast<T>(static_cast<float>(hp[b * Hd + k]) * inv);
      op[b * Hd + k] = static_cast<T>(static_cast<float>(wp[k]) * static_cast<float>(normed));
    }
  }
  return out;
}

// a + b element by element in T, each sum rounded to T as torch's add rounds it (the residual connections).
template <typename T>
at::Tensor residual_add(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty(a.sizes(), a.options());
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < out.numel(); ++i) {
    op[i] = static_cast<T>(static_cast<float>(ap[i]) + static_cast<float>(bp[i]));
  }
  return out;
}

// SiLU(gate) * up for gate, up [B, I]: the SiLU by torch (its exp, so its rounding), the product rounded to T.
template <typename T>
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  const at::Tensor act = at::silu(gate.contiguous());
  const at::Tensor u = up.contiguous();
  at::Tensor out = at::empty(act.sizes(), act.options());
  const T* ap = act.const_data_ptr<T>();
  const T* up_ = u.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < out.numel(); ++i) {
    op[i] = static_cast<T>(static_cast<float>(ap[i]) * static_cast<float>(up_[i]));
  }
  return out;
}

// x * cos + rotate_half(x) * sin for H heads of each row of x [B, >= H * D] (row stride x.stride(0)), each product
// and the sum rounded to T as torch's three ops round them; head h of row b lands at dst + b * sb + h * sh.
template <typename T>
void rope(const at::Tensor& x, int64_t H, int64_t D, const at::Tensor& cos, const at::Tensor& sin, T* dst,
          int64_t sb, int64_t sh) {
  const int64_t half = D / 2;
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  for (int64_t b = 0; b < x.size(0); ++b) {
    const T* row = x.const_data_ptr<T>() + b * x.stride(0);
    for (int64_t h = 0; h < H; ++h) {
      const T* in = row + h * D;
      T* out = dst + b * sb + h * sh;
      for (int64_t d = 0; d < D; ++d) {
        const float rotated = d < half ? -static_cast<float>(in[d + half]) : static_cast<float>(in[d - half]);
        const T a = static_cast<T>(static_cast<float>(in[d]) * static_cast<float>(cp[b * D + d]));
        const T r = static_cast<T>(rotated * static_cast<float>(sp[b * D + d]));
        out[d] = static_cast<T>(static_cast<float>(a) + static_cast<float>(r));
      }
    }
  }
}

// q rotated into q_out [B, Hq, D]; k rotated and v copied into the caches' tails at token `pos` ([B, Hkv, cap, D]).
template <typename T>
void rope_and_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, at::Tensor& q_out, at::Tensor& k_tail, at::Tensor& v_tail, int64_t pos) {
  const int64_t Hq = q_out.size(1), D = q_out.size(2), Hkv = k_tail.size(1), cap = k_tail.size(2);
  rope<T>(q, Hq, D, cos, sin, q_out.data_ptr<T>(), Hq * D, D);
  T* kd = k_tail.data_ptr<T>() + pos * D;
  rope<T>(k, Hkv, D, cos, sin, kd, Hkv * cap * D, cap * D);
  T* vd = v_tail.data_ptr<T>() + pos * D;
  for (int64_t b = 0; b < v.size(0); ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      std::memcpy(vd + (b * Hkv + h) * cap * D, v.const_data_ptr<T>() + b * v.stride(0) + h * D, D * sizeof(T));
}

struct Cache {
  const at::Tensor &k_values, &k_masks;
  at::Tensor& k_tail;
  const at::Tensor &v_values, &v_masks;
  at::Tensor& v_tail;
};

template <typename T>
at::Tensor layer_step(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin, const LayerWeights& w,
                      double eps, Cache kv, int64_t packed, int64_t tail, const std::optional<at::Tensor>& valid,
                      double scale, c10::string_view isa) {
  const int64_t B = hidden.size(0), Hq = w.heads[0], Hkv = w.heads[1], D = w.heads[2];
  const at::Tensor x = rms_norm<T>(hidden, w.input_norm, eps);
  at::Tensor q, k, v;
  if (w.qkv.size() == 1) {
    const at::Tensor qkv = w.qkv[0](x, isa);
    q = qkv.narrow(1, 0, Hq * D), k = qkv.narrow(1, Hq * D, Hkv * D), v = qkv.narrow(1, (Hq + Hkv) * D, Hkv * D);
  } else {
    q = w.qkv[0](x, isa), k = w.qkv[1](x, isa), v = w.qkv[2](x, isa);
  }
  at::Tensor q_rot = at::empty({B, Hq, D}, hidden.options());
  rope_and_append<T>(q, k, v, cos, sin, q_rot, kv.k_tail, kv.v_tail, tail);
  const at::Tensor attn = decode_attention(q_rot, kv.k_values, kv.k_masks, kv.k_tail, kv.v_values, kv.v_masks,
                                           kv.v_tail, packed, tail + 1, valid, scale, isa);
  const at::Tensor h = residual_add<T>(hidden, w.o[0](attn.view({B, Hq * D}), isa));

  const at::Tensor y = rms_norm<T>(h, w.post_norm, eps);
  const int64_t I = w.down[0].K;
  at::Tensor act;
  if (w.gate_up.size() == 1) {
    const at::Tensor gu = w.gate_up[0](y, isa);
    act = silu_mul<T>(gu.narrow(1, 0, I), gu.narrow(1, I, I));
  } else {
    act = silu_mul<T>(w.gate_up[0](y, isa), w.gate_up[1](y, isa));
  }
  return residual_add<T>(h, w.down[0](act, isa));
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_tail,
                  const at::Tensor& v_tail, int64_t Hkv, int64_t D, int64_t tail) {
  TORCH_CHECK(hidden.device().is_cpu() && hidden.dim() == 2 && hidden.is_contiguous(), kOp,
              ": hidden must be a contiguous CPU [batch, hidden], got ", hidden.sizes());
  const at::ScalarType dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, kOp, ": hidden must be float32 or bfloat16, got ",
              dtype);
  const int64_t B = hidden.size(0);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->sizes() == at::IntArrayRef({B, D}) && t->is_contiguous(), kOp,
                ": cos and sin must be contiguous ", dtype, " [", B, ", ", D, "], got ", t->scalar_type(), " ",
                t->sizes());
  }
  TORCH_CHECK(D > 0 && D % 2 == 0, kOp, ": head_dim must be even, got ", D);
  for (const at::Tensor* t : {&k_tail, &v_tail}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 4 && t->is_contiguous() && t->size(0) == B &&
                    t->size(1) == Hkv && t->size(3) == D,
                kOp, ": k_tail and v_tail must be contiguous ", dtype, " [", B, ", ", Hkv, ", cap, ", D, "], got ",
                t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(0 <= tail && tail < t->size(2), kOp, ": no room for token ", tail, " in a tail of ", t->size(2));
  }
}

}  // namespace

at::Tensor decode_layer(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                        const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef shapes,
                        at::IntArrayRef heads, double eps, const at::Tensor& k_values, const at::Tensor& k_masks,
                        at::Tensor& k_tail, const at::Tensor& v_values, const at::Tensor& v_masks, at::Tensor& v_tail,
                        int64_t packed, int64_t tail, const std::optional<at::Tensor>& valid, double scale,
                        c10::string_view isa) {
  TORCH_CHECK(heads.size() == 3, kOp, ": heads must be [query heads, KV heads, head_dim]");
  const int64_t Hq = heads[0], Hkv = heads[1], D = heads[2];
  TORCH_CHECK(Hq > 0 && Hkv > 0 && Hq % Hkv == 0, kOp, ": ", Hq, " query heads are not a multiple of ", Hkv);
  check_inputs(hidden, cos, sin, k_tail, v_tail, Hkv, D, tail);
  const LayerWeights w = parse_weights(weights, shapes, hidden.size(1), hidden.scalar_type(), Hq, Hkv, D);

  if (hidden.scalar_type() == at::kFloat) {
    return layer_step<float>(hidden, cos, sin, w, eps, {k_values, k_masks, k_tail, v_values, v_masks, v_tail},
                             packed, tail, valid, scale, isa);
  }
  return layer_step<c10::BFloat16>(hidden, cos, sin, w, eps, {k_values, k_masks, k_tail, v_values, v_masks, v_tail},
                                   packed, tail, valid, scale, isa);
}

namespace {

// A model's decoder layers for the decode step: each layer's weights parsed and checked once, when it is added, so
// that one call per token runs every layer (DecoderStack.step) with no per-layer argument passing or parsing.
class DecoderStack : public torch::CustomClassHolder {
 public:
  DecoderStack(int64_t hidden, std::vector<int64_t> heads, double eps, double scale)
      : hidden_(hidden), heads_(std::move(heads)), eps_(eps), scale_(scale) {
    TORCH_CHECK(hidden_ > 0 && heads_.size() == 3 && heads_[0] > 0 && heads_[1] > 0 && heads_[0] % heads_[1] == 0 &&
                    heads_[2] > 0 && heads_[2] % 2 == 0,
                "DecoderStack: heads must be [query heads, KV heads dividing them, even head_dim], got ", heads_);
  }

  void add_layer(const c10::List<std::optional<at::Tensor>>& weights, std::vector<int64_t> shapes) {
    const std::optional<at::Tensor> norm = weights.size() ? weights.get(0) : std::nullopt;
    TORCH_CHECK(norm.has_value(), "DecoderStack.add_layer: layer ", layers_.size(), "'s input norm is missing");
    const at::ScalarType dtype = layers_.empty() ? norm->scalar_type() : dtype_;
    layers_.push_back(parse_weights(weights, shapes, hidden_, dtype, heads_[0], heads_[1], heads_[2]));
    dtype_ = dtype;
  }

  // Every layer for one new token per sequence; kv holds each layer's six cache tensors (k_values, k_masks, k_tail,
  // v_values, v_masks, v_tail), packed and tails its token counts. -> the last layer's output.
  at::Tensor step(at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin, std::vector<at::Tensor> kv,
                  std::vector<int64_t> packed, std::vector<int64_t> tails, const std::optional<at::Tensor>& valid,
                  const std::string& isa) {
    const size_t L = layers_.size();
    TORCH_CHECK(kv.size() == 6 * L && packed.size() == L && tails.size() == L, "DecoderStack.step: ", L,
                " layers need ", 6 * L, " cache tensors and ", L, " token counts of each kind, got ", kv.size(), ", ",
                packed.size(), " and ", tails.size());
    TORCH_CHECK(hidden.scalar_type() == dtype_, "DecoderStack.step: hidden must be ", dtype_, " as the layers are");
    for (size_t i = 0; i < L; ++i) {
      at::Tensor* c = kv.data() + 6 * i;
      check_inputs(hidden, cos, sin, c[2], c[5], heads_[1], heads_[2], tails[i]);
      const Cache cache{c[0], c[1], c[2], c[3], c[4], c[5]};
      const LayerWeights& w = layers_[i];
      hidden = dtype_ == at::kFloat
                   ? layer_step<float>(hidden, cos, sin, w, eps_, cache, packed[i], tails[i], valid, scale_, isa)
                   : layer_step<c10::BFloat16>(hidden, cos, sin, w, eps_, cache, packed[i], tails[i], valid, scale_,
                                               isa);
    }
    return hidden;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t hidden_;
  std::vector<int64_t> heads_;
  double eps_, scale_;
  at::ScalarType dtype_ = at::kFloat;
  std::vector<LayerWeights> layers_;
};

}  // namespace

TORCH_LIBRARY_IMPL(sparamx, CPU, m) { m.impl("decode_layer", &decode_layer); }

// The class beside its code (torchbind classes take no schema of their own in registration.cpp's block).
TORCH_LIBRARY_FRAGMENT(sparamx, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, std::vector<int64_t>, double, double>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("step", &DecoderStack::step)
      .def("num_layers", &DecoderStack::num_layers);
}

}  // namespace sparamx
