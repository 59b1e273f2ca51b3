#pragma once
#include <cstdint>

namespace sparamx {

// Bits of cpu_features(); kernels/ops.py names them.
enum CpuFeature : int64_t {
  kAvx512F = 1 << 0,
  kAvx512BW = 1 << 1,
  kAvx512VL = 1 << 2,
  kAvx512Vbmi2 = 1 << 3,
  kAvx512Vnni = 1 << 4,
  kAvx512Bf16 = 1 << 5,
  kAmxTile = 1 << 6,  // set only when the OS granted tile-data permission to this process
  kAmxBf16 = 1 << 7,
  kAmxInt8 = 1 << 8,
};

int64_t cpu_features();
bool has_avx512_bitmap_kernels();

}  // namespace sparamx
