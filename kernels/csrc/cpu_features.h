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
// AVX-512 F/BW/VL/VBMI2/VNNI/BF16: what the expand-load kernels of linear.cpp use.
bool has_avx512_kernels();
// The above plus AMX tile / bf16 / int8 with tile-data permission: what linear_amx.cpp uses.
bool has_amx_kernels();

}  // namespace sparamx
