// AMX tile path of the linear kernels: y^T = W x^T, so no weight is ever transposed.
//
// A tile = 16 weight rows (4 blocks of packed_format.h) x one chunk: 32 bf16 or 64 int8 columns, 64 bytes a row,
// expand-loaded from the bitmap exactly as the AVX-512 path does (or copied, for dense). B tile = 16 activation rows
// of the same chunk in VNNI order, packed once per call by linear.cpp. C tile = [16 weight rows x 16 activation rows]
// of fp32 (tdpbf16ps) or int32 (tdpbsud: signed weights, unsigned activations); the int8 epilogue is every path's
// (store_output), so all give the same numbers. Up to 64 activation rows, one pass of 4 C tiles per weight group, the A
// tiles are expanded chunk by chunk into L1 as they are used; for more, a group is expanded whole once per panel of
// 256 activation rows into a buffer that stays in L2, then reused by every 4 C tiles of the panel.
// Tiles: 0-3 accumulators, 4 weights, 5-7 activations. Intel SDM vol. 1 ch. 18 / the AMX intrinsics guide.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "linear_kernels.h"
#include "packed_format.h"
// Last: see isa_intrinsics.h.
#include "isa_intrinsics.h"

namespace sparamx {
namespace {

constexpr int64_t kBlocksPerGroup = 4;  // 16 weight rows: one A tile
constexpr int64_t kTileBytes = 1024;    // 16 rows x 64 bytes
constexpr int64_t kPanelTiles = 16;     // activation tiles (256 rows) per pass over a thread's weights

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

SPARAMX_AMX_BEGIN

// Reads a group's 16 weight rows (4 blocks) one chunk at a time, as A tiles: 16 rows x 64 bytes.
template <bool Int8>
struct GroupCursor {
  static constexpr int64_t E = Int8 ? 1 : 2, MaskBytes = Int8 ? 8 : 4;
  const uint8_t* v[kBlocksPerGroup];
  const uint8_t* end[kBlocksPerGroup];
  const uint8_t* mk[kBlocksPerGroup];
  bool live[kBlocksPerGroup];
  bool sparse;

  GroupCursor(const Problem& p, int64_t g) : sparse(p.masks != nullptr) {
    const int64_t NB = ceil_div(p.N, kRows);
    for (int64_t i = 0; i < kBlocksPerGroup; ++i) {
      const int64_t b = g * kBlocksPerGroup + i;
      live[i] = b < NB;
      if (!live[i]) continue;
      if (sparse) {
        v[i] = p.values + p.block_offsets[b] * E;
        end[i] = p.values + p.block_offsets[b + 1] * E;
        mk[i] = p.masks + b * p.KC * kRows * MaskBytes;
      } else {  // dense: values[b][c][r][64 bytes]
        v[i] = p.values + b * p.KC * kRows * 64;
      }
    }
  }

  // The next chunk's A tile into dst; rows past the last block are zero. False when a block's masks ask for more
  // values than block_offsets gives it.
  bool next(uint8_t* dst) {
    for (int64_t i = 0; i < kBlocksPerGroup; ++i) {
      uint8_t* rows = dst + i * kRows * 64;
      if (!live[i]) {
        std::memset(rows, 0, kRows * 64);
      } else if (!sparse) {
        std::memcpy(rows, v[i], kRows * 64);
        v[i] += kRows * 64;
      } else {
        for (int r = 0; r < kRows; ++r) {
          uint64_t bits = 0;
          std::memcpy(&bits, mk[i] + r * MaskBytes, MaskBytes);
          const int64_t count = __builtin_popcountll(bits);
          if (v[i] + count * E > end[i]) return false;
          const __m512i raw = _mm512_loadu_si512(v[i]);  // values end with a register of slack (packed_format.h)
          __m512i w;
          if constexpr (Int8) w = _mm512_maskz_expand_epi8(bits, raw);
          else w = _mm512_maskz_expand_epi16(static_cast<__mmask32>(bits), raw);
          _mm512_storeu_si512(rows + r * 64, w);
          v[i] += count * E;
        }
        mk[i] += kRows * MaskBytes;
      }
    }
    return true;
  }

  // After the last chunk: every block used exactly its values.
  bool done() const {
    for (int64_t i = 0; i < kBlocksPerGroup; ++i) {
      if (sparse && live[i] && v[i] != end[i]) return false;
    }
    return true;
  }
};

// C tiles 0..NT-1 = group g's weights x activation tiles t0..t0+NT-1 over every chunk. A tiles come from `a`
// (the group expanded whole, kTileBytes per chunk) or, when `a` is null, are expanded chunk by chunk into two
// alternating L1 slots, the next one written while the tile unit works on the last. Then y from the C tiles.
// Tile numbers are literals: the intrinsics paste them into the instruction.
template <bool Int8, int NT>
bool group_tiles(const Problem& p, int64_t g, const uint8_t* a, int64_t t0, uint8_t* slots, float* scratch) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  GroupCursor<Int8> cursor(p, g);
  const int64_t stride = p.KC * kTileBytes;  // from one activation tile to the next, same chunk
  const uint8_t* bt = p.x + t0 * stride;
  for (int64_t c = 0; c < p.KC; ++c, bt += kTileBytes) {
    const uint8_t* at = a ? a + c * kTileBytes : slots + (c & 1) * kTileBytes;
    if (!a && !cursor.next(slots + (c & 1) * kTileBytes)) return false;
    _tile_loadd(4, at, 64);
    _tile_loadd(5, bt, 64);
    if constexpr (Int8) _tile_dpbsud(0, 4, 5);
    else _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(6, bt + stride, 64);
      if constexpr (Int8) _tile_dpbsud(1, 4, 6);
      else _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NT > 2) {
      _tile_loadd(7, bt + 2 * stride, 64);
      if constexpr (Int8) _tile_dpbsud(2, 4, 7);
      else _tile_dpbf16ps(2, 4, 7);
    }
    if constexpr (NT > 3) {
      _tile_loadd(5, bt + 3 * stride, 64);
      if constexpr (Int8) _tile_dpbsud(3, 4, 5);
      else _tile_dpbf16ps(3, 4, 5);
    }
  }
  if (!a && !cursor.done()) return false;
  _tile_stored(0, scratch, 64);
  if constexpr (NT > 1) _tile_stored(1, scratch + 256, 64);
  if constexpr (NT > 2) _tile_stored(2, scratch + 512, 64);
  if constexpr (NT > 3) _tile_stored(3, scratch + 768, 64);
  const int64_t n0 = g * kBlocksPerGroup * kRows;
  const int64_t rows = p.N - n0 < 16 ? p.N - n0 : 16;
  for (int j = 0; j < NT; ++j) {
    const int64_t m0 = (t0 + j) * kAmxTileRows;
    const int64_t ms = p.M - m0 < 16 ? p.M - m0 : 16;
    const float* cf = scratch + j * 256;
    const int32_t* ci = reinterpret_cast<const int32_t*>(cf);
    for (int64_t i = 0; i < ms; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        if constexpr (Int8) store_output(p, m0 + i, n0 + r, ci[r * 16 + i]);
        else store_output(p, m0 + i, n0 + r, cf[r * 16 + i]);
      }
  }
  return true;
}

// Groups [g0, g1) for every activation row. Up to 4 activation tiles (64 rows) the weights are expanded chunk by
// chunk as they are used; beyond, each group is expanded whole into `buf` (L2) once per panel of activation tiles.
template <bool Int8>
bool groups_amx(const Problem& p, int64_t g0, int64_t g1, uint8_t* buf, uint8_t* slots, float* scratch) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);  // per thread: the tile configuration is thread state
  bool ok = true;
  const int64_t tiles = (p.M + kAmxTileRows - 1) / kAmxTileRows;
  const bool whole = tiles > 4;
  for (int64_t p0 = 0; p0 < tiles && ok; p0 += kPanelTiles) {
    const int64_t p1 = p0 + kPanelTiles < tiles ? p0 + kPanelTiles : tiles;
    for (int64_t g = g0; g < g1 && ok; ++g) {
      const uint8_t* a = nullptr;
      if (whole) {
        GroupCursor<Int8> cursor(p, g);
        for (int64_t c = 0; c < p.KC && ok; ++c) ok = cursor.next(buf + c * kTileBytes);
        if (!ok || !cursor.done()) {
          ok = false;
          break;
        }
        a = buf;
      }
      int64_t t = p0;
      for (; t + 4 <= p1 && ok; t += 4) ok = group_tiles<Int8, 4>(p, g, a, t, slots, scratch);
      if (!ok) break;
      switch (p1 - t) {
        case 3: ok = group_tiles<Int8, 3>(p, g, a, t, slots, scratch); break;
        case 2: ok = group_tiles<Int8, 2>(p, g, a, t, slots, scratch); break;
        case 1: ok = group_tiles<Int8, 1>(p, g, a, t, slots, scratch); break;
        default: break;
      }
    }
  }
  _tile_release();
  return ok;
}

SPARAMX_ISA_END

}  // namespace

bool amx_linear(const Problem& p) {
  const int64_t NB = ceil_div(p.N, kRows), NG = ceil_div(NB, kBlocksPerGroup);
  const bool int8 = p.row_sums != nullptr;
  std::vector<int64_t> group_offsets;
  if (p.block_offsets) {  // nonzeros before each group: the split weighs groups by their values
    group_offsets.resize(NG + 1);
    for (int64_t g = 0; g <= NG; ++g) {
      group_offsets[g] = p.block_offsets[g * kBlocksPerGroup < NB ? g * kBlocksPerGroup : NB];
    }
  }
  const int64_t threads = at::get_num_threads();
  const int64_t parts = threads < NG ? threads : NG;
  if (parts < 1) return true;
  const std::vector<int64_t> bounds = split_blocks(p.block_offsets ? group_offsets.data() : nullptr, NG, parts);
  const int64_t tiles = (p.M + kAmxTileRows - 1) / kAmxTileRows;
  const size_t buf_bytes = tiles > 4 ? static_cast<size_t>(p.KC * kTileBytes) : 0;
  std::atomic<bool> ok{true};
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    // Kept per thread across calls: a fresh allocation of this size is an mmap, page faults and, on release, TLB
    // shootdowns across every thread, which cost more than the tile work of a small M.
    thread_local std::vector<uint8_t> buf;
    alignas(64) uint8_t slots[2 * kTileBytes];
    alignas(64) float scratch[4 * 256];
    if (buf.size() < buf_bytes) buf.resize(buf_bytes);
    for (int64_t t = begin; t < end; ++t) {
      const bool done = int8 ? groups_amx<true>(p, bounds[t], bounds[t + 1], buf.data(), slots, scratch)
                               : groups_amx<false>(p, bounds[t], bounds[t + 1], buf.data(), slots, scratch);
      if (!done) ok = false;
    }
  });
  return ok.load();
}

}  // namespace sparamx
