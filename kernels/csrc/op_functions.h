#pragma once
// The C++ functions behind the sparamx ops that other ops call directly (no dispatcher in between): the decode
// layer (decode_layer.cpp) runs the linear and attention ops this way. Also the conversion they share.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace sparamx {

at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& masks,
                         const at::Tensor& block_offsets, const at::Tensor& row_sums, int64_t out_features,
                         int64_t in_features, const std::optional<at::Tensor>& weight_scale,
                         const std::optional<at::Tensor>& bias, c10::string_view isa, bool x_symmetric);

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_sums,
                        int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& weight_scale,
                        const std::optional<at::Tensor>& bias, c10::string_view isa, bool x_symmetric);

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_values, const at::Tensor& k_masks,
                            const at::Tensor& k_tail, const at::Tensor& v_values, const at::Tensor& v_masks,
                            const at::Tensor& v_tail, int64_t packed, int64_t tail,
                            const std::optional<at::Tensor>& valid, double scale, c10::string_view isa);

// fp32 `result` as `dtype` (fp32: itself, contiguous; bf16: rounded to nearest even as Tensor.to rounds), in one loop.
at::Tensor to_dtype(const at::Tensor& result, at::ScalarType dtype);

}  // namespace sparamx
