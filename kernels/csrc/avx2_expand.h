#pragma once
// The AVX2 paths' bitmap expansion without vpexpand (linear_avx2.cpp, attention_avx2.cpp): per mask byte (8 columns)
// the shuffle that moves the next popcount(byte) values into the columns whose bits are set, zeros elsewhere.
#include <cstdint>

namespace sparamx {

struct ExpandTables {
  // Mask byte -> vpshufb control for 16 bytes (8 bf16) broadcast to both lanes: fp32 lane j gets the next value's
  // two bytes in its high half when bit j is set, zero otherwise.
  alignas(32) uint8_t bf16[256][32];
  // Mask byte -> pshufb control for 8 int8 values: byte j gets the next value when bit j is set; bytes 8-15 zero.
  alignas(16) uint8_t int8[256][16];

  ExpandTables() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool set = (m >> j) & 1;
        uint8_t* lane = bf16[m] + 4 * j;
        lane[0] = lane[1] = 0x80;
        lane[2] = set ? static_cast<uint8_t>(2 * rank) : 0x80;
        lane[3] = set ? static_cast<uint8_t>(2 * rank + 1) : 0x80;
        int8[m][j] = set ? static_cast<uint8_t>(rank) : 0x80;
        int8[m][8 + j] = 0x80;
        rank += set;
      }
    }
  }
};

// Built at load time (linear_avx2.cpp), outside any AVX2 region.
extern const ExpandTables kExpandTables;

}  // namespace sparamx
