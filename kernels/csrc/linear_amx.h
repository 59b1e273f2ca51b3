#pragma once
// What linear.cpp hands the AMX tile path (linear_amx.cpp), and the work split both paths use.
#include <cstdint>
#include <vector>

namespace sparamx {

// Activation rows per AMX tile; x is packed as B tiles of this many rows (zero rows past M).
constexpr int64_t kAmxTileRows = 16;

struct AmxProblem {
  // x as B tiles [ceil(M/16)][KC][16][64 bytes]: tile (t, c) row j holds activation rows 16t..16t+15 of chunk c's
  // columns 2j, 2j+1 (bf16 pairs) or 4j..4j+3 (uint8 quads): the VNNI order tdpbf16ps / tdpbsud read.
  const uint8_t* xt;
  int64_t M, N, NB, KC;
  bool int8;
  const uint8_t* values;
  const uint8_t* masks;          // null for dense
  const int64_t* block_offsets;  // null for dense
  const int32_t* row_sums;       // int8 only
  const float* weight_scale;     // int8 only [N]
  const float* x_scale;          // int8 only [M]
  const int32_t* x_zero;         // int8 only [M]
  const float* bias;             // nullable [N]
  float* y;                      // [M, N]
};

// y for every row of x on AMX tiles; false when a bitmap block's masks disagree with block_offsets.
bool amx_linear(const AmxProblem& p);

// Block ranges [bounds[t], bounds[t+1]) holding equal shares of the nonzeros (equal block counts when
// block_offsets is null), so threads finish together whatever the per-row sparsity.
std::vector<int64_t> split_blocks(const int64_t* block_offsets, int64_t NB, int64_t parts);

}  // namespace sparamx
