#pragma once
// The walk every register-blocked kernel path shares (linear_avx512.cpp, linear_avx2.cpp): output blocks [b0, b1)
// for every row of x, activation rows kTileRows at a time (they stay in L2) and, within one block, up to 4 at a time
// (the block's weights stay in L1), so weights stream from memory once per kTileRows rows of x.
// A path provides Kernel::block<Int8, Sparse, MB>(p, b, m0) -- y of block b for rows [m0, m0 + MB) -- and
// Kernel::unpack<Sparse>(p, b, out) -- bf16 block b as fp32 rows for the prefill GEMM; both false when a bitmap
// block's masks disagree with block_offsets.
#include <algorithm>

#include "linear_kernels.h"
#include "packed_format.h"

namespace sparamx {

constexpr int64_t kTileRows = 64;

template <typename Kernel, bool Int8, bool Sparse>
bool walk_rows(const Problem& p, int64_t b0, int64_t b1) {
  bool ok = true;
  for (int64_t t = 0; t < p.M; t += kTileRows) {
    const int64_t t1 = std::min(p.M, t + kTileRows);
    for (int64_t b = b0; b < b1 && ok; ++b) {
      int64_t m = t;
      for (; m + 4 <= t1; m += 4) ok &= Kernel::template block<Int8, Sparse, 4>(p, b, m);
      switch (t1 - m) {
        case 3: ok &= Kernel::template block<Int8, Sparse, 3>(p, b, m); break;
        case 2: ok &= Kernel::template block<Int8, Sparse, 2>(p, b, m); break;
        case 1: ok &= Kernel::template block<Int8, Sparse, 1>(p, b, m); break;
        default: break;
      }
    }
  }
  return ok;
}

template <typename Kernel>
bool walk_blocks(const Problem& p, int64_t b0, int64_t b1) {
  const bool sparse = p.masks != nullptr;
  if (p.row_sums) return sparse ? walk_rows<Kernel, true, true>(p, b0, b1) : walk_rows<Kernel, true, false>(p, b0, b1);
  return sparse ? walk_rows<Kernel, false, true>(p, b0, b1) : walk_rows<Kernel, false, false>(p, b0, b1);
}

template <typename Kernel>
bool unpack_block(const Problem& p, int64_t b, float* out) {
  return p.masks ? Kernel::template unpack<true>(p, b, out) : Kernel::template unpack<false>(p, b, out);
}

}  // namespace sparamx
