#pragma once
// What linear.cpp (checks, dispatch, threads) hands its kernel paths: the AVX-512 expand-load kernels
// (linear_avx512.cpp), the AVX2 table-shuffle kernels (linear_avx2.cpp) and the AMX tiles (linear_amx.cpp).
#include <cstdint>
#include <vector>

namespace sparamx {

// Activation rows per AMX tile; for the AMX path x is packed as B tiles of this many rows (zero rows past M).
constexpr int64_t kAmxTileRows = 16;

struct Problem {
  // Activations, laid out for the path that reads them, zero-padded to Kp columns:
  //   AVX-512: uint8 [M, Kp] for int8 weights; for bf16 weights fp32 of bf16-rounded x with each chunk's 32
  //            columns stored even columns first, then odd ones.
  //   AVX2:    int16 [M, Kp] (the uint8 values, widened) for int8 weights; fp32 of bf16-rounded x for bf16.
  //   AMX:     B tiles [ceil(M/16)][KC][16][64 bytes], tile (t, c) row j holding activation rows 16t..16t+15 of chunk
  //            c's columns 2j, 2j+1 (bf16 pairs) or 4j..4j+3 (uint8 quads): the VNNI order tdpbf16ps / tdpbsud read.
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

// The epilogue every path shares: y[m][n] from its sum of products plus the bias; for int8 the sum is the exact
// integer dot product, less the zero point times the row's weight sum, times both scales. (Built without floating-
// point contraction, so every path and build rounds it the same.)
inline void store_output(const Problem& p, int64_t m, int64_t n, float sum) {
  p.y[m * p.N + n] = p.bias ? sum + p.bias[n] : sum;
}

inline void store_output(const Problem& p, int64_t m, int64_t n, int32_t dot) {
  const int32_t exact = dot - p.x_zero[m] * p.row_sums[n];
  store_output(p, m, n, p.x_scale[m] * p.weight_scale[n] * static_cast<float>(exact));
}

// Rows [b0 * kRows, b1 * kRows) of y, for every row of x. False when a bitmap block's masks ask for more values than
// block_offsets gives it, or fewer (checked before reading past the block).
bool avx512_blocks(const Problem& p, int64_t b0, int64_t b1);
bool avx2_blocks(const Problem& p, int64_t b0, int64_t b1);

// bf16 block b as fp32 rows [b*kRows, b*kRows + kRows) of `out` (row stride Kp floats, natural column order), for
// the prefill GEMM. False as above.
bool avx512_unpack_block(const Problem& p, int64_t b, float* out);
bool avx2_unpack_block(const Problem& p, int64_t b, float* out);

// Block b as rows [b*kRows, b*kRows + kRows) of `out` in the values' own type (int8, or bf16), row stride Kp values,
// natural column order, zeros where no weight is kept: for the prefill GEMMs on torch's int8 and bf16 kernels. False
// as above.
bool avx512_unpack_raw_block(const Problem& p, int64_t b, void* out);

// y for every row of x on AMX tiles (x packed as B tiles); false as above.
bool amx_linear(const Problem& p);

// From how many rows of x isa=auto runs the AMX tiles where the CPU has them (kAmxRows of linear.cpp).
int64_t amx_min_rows();

// From how many rows of x the AVX-512 path runs int8 weights on torch's int8 GEMM (kInt8GemmRows of linear.cpp); 0
// where that GEMM does not give exact dot products in this process.
int64_t int8_gemm_rows();

// Block ranges [bounds[t], bounds[t+1]) holding equal shares of the nonzeros (equal block counts when
// block_offsets is null), so threads finish together whatever the per-row sparsity.
std::vector<int64_t> split_blocks(const int64_t* block_offsets, int64_t NB, int64_t parts);

}  // namespace sparamx
