#pragma once
// What linear.cpp hands its kernel paths (the AVX-512 code in linear.cpp, the AMX tiles in linear_amx.cpp), and the
// work split both use.
#include <cstdint>
#include <vector>

namespace sparamx {

// Activation rows per AMX tile; for the AMX path x is packed as B tiles of this many rows (zero rows past M).
constexpr int64_t kAmxTileRows = 16;

struct Problem {
  // Activations, laid out for the path that reads them. AVX-512: [M, Kp], uint8 for int8 weights, or fp32 of
  // bf16-rounded x with each chunk's 32 columns stored even columns first, then odd ones, for bf16 weights.
  // AMX: B tiles [ceil(M/16)][KC][16][64 bytes], tile (t, c) row j holding activation rows 16t..16t+15 of chunk c's
  // columns 2j, 2j+1 (bf16 pairs) or 4j..4j+3 (uint8 quads): the VNNI order tdpbf16ps / tdpbsud read.
  const uint8_t* x;
  int64_t M, Kp, N, KC;
  const uint8_t* values;
  const uint8_t* masks;           // null for dense
  const int64_t* block_offsets;   // null for dense
  const int32_t* row_sums;        // int8 only (null for bf16: how the paths tell the two apart)
  const float* weight_scale;      // int8 only [N]
  const float* x_scale;           // int8 only [M]
  const int32_t* x_zero;          // int8 only [M]
  const float* bias;              // nullable [N]
  float* y;                       // [M, N]
};

// y for every row of x on AMX tiles (x packed as B tiles); false when a bitmap block's masks disagree with
// block_offsets.
bool amx_linear(const Problem& p);

// Block ranges [bounds[t], bounds[t+1]) holding equal shares of the nonzeros (equal block counts when
// block_offsets is null), so threads finish together whatever the per-row sparsity.
std::vector<int64_t> split_blocks(const int64_t* block_offsets, int64_t NB, int64_t parts);

}  // namespace sparamx
