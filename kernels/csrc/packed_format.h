#pragma once
// The load-time ("prepacked") weight layout the linear kernels read. Derived from the canonical artifact tensors by
// bitmap_prepack / dense_prepack; never stored, and nothing in it depends on the thread count.
//
// Output rows are taken kRows at a time (a "block"; the last one is padded with empty rows) and columns kChunk at a
// time, kChunk = one 512-bit register of weights: 32 for bf16, 64 for int8. For block b and chunk c:
//   sparse: masks[b][c][r] holds row r's kChunk bits for columns [c*kChunk, (c+1)*kChunk) (bit i = column
//           c*kChunk + i), and the block's values hold, chunk after chunk, row 0's set values, then row 1's, ...
//           So one expand-load per row and chunk reads the next popcount(mask) values, and one activation load
//           serves kRows rows. block_offsets[b] is where block b's values start; it equals row_offsets[b*kRows].
//   dense:  values[b][c][r][0..kChunk) zero-padded past in_features and past the last row.
// row_sums[n] = sum of row n's int8 values (the zero-point correction of uint8 activations); empty for bf16.
#include <c10/core/ScalarType.h>  // not ATen.h: the kernel files that read this header build in seconds without it

#include <cstdint>

namespace at {
class Tensor;
}

namespace sparamx {

constexpr int64_t kRows = 4;

inline int64_t chunk_width(at::ScalarType values) { return values == at::kChar ? 64 : 32; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void bitmap_check(const at::Tensor& compressed, const at::Tensor& bitmask, const at::Tensor& row_offsets,
                  int64_t in_features);

}  // namespace sparamx
