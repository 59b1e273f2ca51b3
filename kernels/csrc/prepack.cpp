// Prepack: canonical artifact tensors -> the blocked layout of packed_format.h, and back (for the reference path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "packed_format.h"

namespace sparamx {

namespace {

void check_weight_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kChar, op, ": values must be bfloat16 or int8, got ", dtype);
}

// Bits [first, first + width) of a little-bit-order bitmask row of nbytes bytes (first is a multiple of 8).
uint64_t row_bits(const uint8_t* row, int64_t nbytes, int64_t first, int64_t width) {
  uint64_t bits = 0;
  const int64_t byte = first / 8;
  std::memcpy(&bits, row + byte, static_cast<size_t>(std::max<int64_t>(0, std::min(width / 8, nbytes - byte))));
  return bits;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bitmap_prepack(const at::Tensor& compressed,
                                                                          const at::Tensor& bitmask,
                                                                          const at::Tensor& row_offsets,
                                                                          int64_t in_features) {
  bitmap_check(compressed, bitmask, row_offsets, in_features);
  check_weight_dtype("bitmap_prepack", compressed.scalar_type());
  const at::Tensor src_values = compressed.contiguous();
  const at::Tensor bits = bitmask.contiguous();
  const at::Tensor offsets = row_offsets.contiguous();
  const int64_t N = bits.size(0), K = in_features, nbytes = bits.size(1);
  const int64_t C = chunk_width(compressed.scalar_type()), NB = ceil_div(N, kRows), KC = ceil_div(K, C);
  const int64_t elem = compressed.element_size(), mask_bytes = C / 8;
  const bool int8 = compressed.scalar_type() == at::kChar;

  at::Tensor values = at::zeros({src_values.numel() + C}, src_values.options());  // + slack: see packed_format.h
  at::Tensor masks = at::zeros({NB, KC, kRows * mask_bytes}, bits.options());
  at::Tensor block_offsets = at::empty({NB + 1}, offsets.options());
  at::Tensor row_sums = at::zeros({int8 ? NB * kRows : 0}, offsets.options().dtype(at::kInt));
  const int64_t* op = offsets.const_data_ptr<int64_t>();
  int64_t* bo = block_offsets.data_ptr<int64_t>();
  for (int64_t b = 0; b < NB; ++b) bo[b] = op[b * kRows];
  bo[NB] = src_values.numel();

  const auto* src = static_cast<const uint8_t*>(src_values.const_data_ptr());
  auto* dst_base = static_cast<uint8_t*>(values.data_ptr());
  const uint8_t* bp = bits.const_data_ptr<uint8_t>();
  uint8_t* mp = masks.data_ptr<uint8_t>();
  int32_t* sums = int8 ? row_sums.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, NB, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min(kRows, N - b * kRows);
      const uint8_t* read[kRows];
      for (int64_t r = 0; r < rows; ++r) read[r] = src + op[b * kRows + r] * elem;
      uint8_t* dst = dst_base + bo[b] * elem;
      for (int64_t c = 0; c < KC; ++c) {
        for (int64_t r = 0; r < rows; ++r) {
          const uint64_t chunk = row_bits(bp + (b * kRows + r) * nbytes, nbytes, c * C, C);
          std::memcpy(mp + (b * KC + c) * kRows * mask_bytes + r * mask_bytes, &chunk, mask_bytes);
          const int64_t count = __builtin_popcountll(chunk);
          std::memcpy(dst, read[r], count * elem);
          if (sums) {
            for (int64_t i = 0; i < count; ++i) sums[b * kRows + r] += static_cast<int8_t>(read[r][i]);
          }
          dst += count * elem;
          read[r] += count * elem;
        }
      }
    }
  });
  return {values, masks, block_offsets, row_sums};
}

std::tuple<at::Tensor, at::Tensor> dense_prepack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "dense_prepack: expected a CPU tensor, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2, "dense_prepack: expected a 2-D weight [out, in], got shape ", weight.sizes());
  check_weight_dtype("dense_prepack", weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1), C = chunk_width(weight.scalar_type());
  const int64_t NB = ceil_div(N, kRows), KC = ceil_div(K, C);
  // [N, K] -> zero-pad to [NB*kRows, KC*C] -> [NB, kRows, KC, C] -> [NB, KC, kRows, C].
  const at::Tensor padded = at::constant_pad_nd(weight, {0, KC * C - K, 0, NB * kRows - N}, 0);
  at::Tensor values = padded.view({NB, kRows, KC, C}).permute({0, 2, 1, 3}).contiguous();
  at::Tensor row_sums = weight.scalar_type() == at::kChar
                            ? at::constant_pad_nd(weight.sum(1, /*keepdim=*/false, at::kInt), {0, NB * kRows - N}, 0)
                            : at::zeros({0}, weight.options().dtype(at::kInt));
  return {values, row_sums};
}

// The dense [N, K] weight behind prepacked tensors (masks and block_offsets undefined for the dense layout). The
// masks must already agree with block_offsets (each block reads its own values only, so blocks go in parallel).
at::Tensor prepacked_to_dense(const at::Tensor& values, const at::Tensor& masks, const at::Tensor& block_offsets,
                              int64_t N, int64_t K) {
  const int64_t C = chunk_width(values.scalar_type()), NB = ceil_div(N, kRows), KC = ceil_div(K, C);
  if (!masks.defined()) {
    return values.view({NB, KC, kRows, C}).permute({0, 2, 1, 3}).reshape({NB * kRows, KC * C}).narrow(0, 0, N)
        .narrow(1, 0, K).contiguous();
  }
  at::Tensor dense = at::zeros({NB * kRows, KC * C}, values.options());
  const int64_t elem = values.element_size(), mask_bytes = C / 8;
  const auto* base = static_cast<const uint8_t*>(values.const_data_ptr());
  const int64_t* bo = block_offsets.const_data_ptr<int64_t>();
  auto* dst = static_cast<uint8_t*>(dense.data_ptr());
  const uint8_t* mp = masks.const_data_ptr<uint8_t>();
  at::parallel_for(0, NB, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* src = base + bo[b] * elem;
      for (int64_t c = 0; c < KC; ++c) {
        for (int64_t r = 0; r < kRows; ++r) {
          uint64_t chunk = 0;
          std::memcpy(&chunk, mp + ((b * KC + c) * kRows + r) * mask_bytes, mask_bytes);
          uint8_t* row = dst + ((b * kRows + r) * KC * C + c * C) * elem;
          for (; chunk; chunk &= chunk - 1, src += elem) std::memcpy(row + __builtin_ctzll(chunk) * elem, src, elem);
        }
      }
    }
  });
  return dense.narrow(0, 0, N).narrow(1, 0, K).contiguous();
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) {
  m.impl("bitmap_prepack", &bitmap_prepack);
  m.impl("dense_prepack", &dense_prepack);
}

}  // namespace sparamx
