#pragma once
// Software AMX tiles for the test-only emulated build (SPARAMX_EMULATED; tests/kernels/emulated.py): eight tile
// registers per thread and the instructions linear_amx.cpp uses, as the Intel SDM (vol. 1 ch. 18) defines them:
// TDPBF16PS adds bf16 pair products into fp32, TDPBSUD signed-byte x unsigned-byte quads into int32.
#include <cstdint>
#include <cstring>

namespace sparamx {
namespace emulation {

struct Tiles {
  uint8_t rows[8];
  uint16_t colsb[8];
  alignas(64) uint8_t data[8][16 * 64];
};

inline Tiles& tiles() {
  static thread_local Tiles t;
  return t;
}

inline void tile_loadconfig(const void* config) {  // palette 1: colsb (uint16) from byte 16, rows from byte 48
  const auto* c = static_cast<const uint8_t*>(config);
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&tiles().colsb[i], c + 16 + 2 * i, 2);
    tiles().rows[i] = c[48 + i];
  }
}

inline void tile_loadd(int t, const void* base, int64_t stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    std::memcpy(tiles().data[t] + r * 64, static_cast<const uint8_t*>(base) + r * stride, tiles().colsb[t]);
}

inline void tile_stored(int t, void* base, int64_t stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles().data[t] + r * 64, tiles().colsb[t]);
}

inline float bf16_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// C[m][n] += sum over k of A[m][k] . B[k][n], each element a pair (bf16) or a quad (int8) of 4 bytes.
template <bool Int8>
inline void tile_dp(int c, int a, int b) {
  Tiles& t = tiles();
  const int M = t.rows[c], N = t.colsb[c] / 4, K = t.colsb[a] / 4;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      uint8_t* out = t.data[c] + m * 64 + n * 4;
      if constexpr (Int8) {
        int32_t acc;
        std::memcpy(&acc, out, 4);
        for (int k = 0; k < K; ++k)
          for (int i = 0; i < 4; ++i)
            acc += static_cast<int8_t>(t.data[a][m * 64 + 4 * k + i]) * t.data[b][k * 64 + 4 * n + i];
        std::memcpy(out, &acc, 4);
      } else {
        float acc;
        std::memcpy(&acc, out, 4);
        for (int k = 0; k < K; ++k)
          for (int i = 0; i < 2; ++i)
            acc += bf16_to_float(t.data[a] + m * 64 + 4 * k + 2 * i) * bf16_to_float(t.data[b] + k * 64 + 4 * n + 2 * i);
        std::memcpy(out, &acc, 4);
      }
    }
  }
}

}  // namespace emulation
}  // namespace sparamx

#undef _tile_loadconfig
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbf16ps
#undef _tile_dpbsud
#undef _tile_release
#define _tile_loadconfig(config) sparamx::emulation::tile_loadconfig(config)
#define _tile_zero(t) std::memset(sparamx::emulation::tiles().data[t], 0, 16 * 64)
#define _tile_loadd(t, base, stride) sparamx::emulation::tile_loadd(t, base, stride)
#define _tile_stored(t, base, stride) sparamx::emulation::tile_stored(t, base, stride)
#define _tile_dpbf16ps(c, a, b) sparamx::emulation::tile_dp<false>(c, a, b)
#define _tile_dpbsud(c, a, b) sparamx::emulation::tile_dp<true>(c, a, b)
#define _tile_release() ((void)0)
