// cuflash: shared-memory tile layout and the copies between global and shared memory.
//
// A tile holds kRows x kCols 16-bit elements. It is stored as panels of 32 columns
// (64 bytes a row); inside a panel, 16-byte chunk c of row r sits at position
// c ^ ((r >> 1) & 3). Eight consecutive rows of one logical chunk then land in eight
// different 16-byte bank groups, so ldmatrix (plain or .trans) reads them with no
// bank conflict, for every head dim that is a multiple of 32.
#pragma once
#include "common.cuh"

namespace cuflash {

// Two per-lane ldmatrix byte offsets (see SmemTile::lane_offsets).
struct LaneOffsets {
  u32 even, odd;
};

template <int kRows, int kCols>
struct SmemTile {
  static_assert(kCols % 32 == 0, "tile width must be a multiple of 32 elements");
  static_assert(kRows % 16 == 0, "tile height must be a multiple of 16 rows");
  static constexpr int kRowCount = kRows;
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kChunks = kRows * kChunksPerRow;
  static constexpr int kBytes = kRows * kCols * 2;

  // Byte offset of 16-byte chunk `chunk` (columns 8*chunk .. 8*chunk+7) of row `row`.
  static CUFLASH_DEVICE u32 offset(int row, int chunk) {
    const int panel = chunk >> 2;
    const int swizzled = (chunk & 3) ^ ((row >> 1) & 3);
    return u32(((panel * kRows + row) * 32 + swizzled * 8) * 2);
  }

  // Chunk i of a panel-major walk: the lanes of a warp cover 8 rows x 4 chunks of one
  // panel, which both coalesces the global side and spreads the shared-memory side.
  static CUFLASH_DEVICE void chunk_coords(int i, int& row, int& chunk) {
    const int panel = i / (kRows * 4);
    const int within = i - panel * kRows * 4;
    row = within >> 2;
    chunk = panel * 4 + (within & 3);
  }

  // ldmatrix addressing. A lane reads row lane_row + R and chunk lane_chunk + C, with
  // R % 8 == 0, C % 2 == 0 and lane_chunk in {0, 1}: the swizzle then depends on (R, C)
  // only through bit 1 of C, so every address is one of two per-lane offsets plus a
  // compile-time constant, and the unrolled loops need no per-step address registers.
  static CUFLASH_DEVICE LaneOffsets lane_offsets(int lane_row, int lane_chunk) {
    return {offset(lane_row, lane_chunk), offset(lane_row, lane_chunk ^ 2)};
  }
  static CUFLASH_DEVICE u32 ldsm(u32 base, const LaneOffsets& lo, int R, int C) {
    return base + (((C >> 1) & 1) ? lo.odd : lo.even) + u32(((C >> 2) * kRows + R) * 64);
  }
};

// Walk of a tile by kThreads threads, 16 bytes each per step. Thread tid starts at chunk
// coords(tid); step `it` adds the constant coords(it * kThreads) (a multiple of 8 rows and
// of 4 chunks), which leaves the swizzle unchanged: one address register per thread.
template <int kRows, int kCols, int kThreads>
struct TileWalk {
  using Tile = SmemTile<kRows, kCols>;
  static constexpr int kPanelChunks = kRows * 4;
  static constexpr int kSteps = (Tile::kChunks + kThreads - 1) / kThreads;
  static constexpr bool kRagged = Tile::kChunks % kThreads != 0;  // last step part-empty
  static_assert(kPanelChunks % kThreads == 0 || kThreads % kPanelChunks == 0,
                "threads must tile whole panels or divide one");
  static CUFLASH_DEVICE void step_coords(int it, int& row, int& chunk) {
    Tile::chunk_coords(it * kThreads, row, chunk);
  }
};

// Global -> shared copy of one tile. Rows >= rows_valid and columns >= cols_valid are
// zero-filled, so padded keys and values contribute exactly nothing.
// kVec: 16-byte cp.async copies (needs cols_valid % 8 == 0, 16-byte aligned rows);
// otherwise element-wise loads and a synchronous shared store.
// kUnroll: unrolled, ptxas keeps every step's address live across the whole main loop;
// that is fastest while registers are plentiful, but costs the registers that large
// accumulators need (spills at d128 with 32 rows a warp), so big tiles use a rolled loop.
template <int kRows, int kCols, int kThreads, bool kVec, bool kUnroll = true>
CUFLASH_DEVICE void load_tile(u32 smem, const u16* __restrict__ gmem, i64 row_stride,
                              int rows_valid, int cols_valid, int tid) {
  using Walk = TileWalk<kRows, kCols, kThreads>;
  int row_l, chunk_l;
  Walk::Tile::chunk_coords(tid, row_l, chunk_l);
  const u16* src_l = gmem + row_l * row_stride + chunk_l * 8;
  const u32 dst_l = smem + Walk::Tile::offset(row_l, chunk_l);
  auto copy_step = [&](int it) {
    int row_it, chunk_it;
    Walk::step_coords(it, row_it, chunk_it);
    if (Walk::kRagged && it * kThreads + tid >= Walk::Tile::kChunks) return;
    const int row = row_l + row_it;
    const int col = (chunk_l + chunk_it) * 8;
    const u16* src = src_l + row_it * row_stride + chunk_it * 8;
    const u32 dst = dst_l + u32(((chunk_it >> 2) * kRows + row_it) * 64);
    if (kVec) {
      const bool pred = row < rows_valid && col < cols_valid;
      cp_async_16(dst, pred ? src : gmem, pred);
    } else {
      u16 e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        e[j] = (row < rows_valid && col + j < cols_valid) ? src[j] : u16(0);
      }
      const u32 packed[4] = {u32(e[0]) | (u32(e[1]) << 16), u32(e[2]) | (u32(e[3]) << 16),
                             u32(e[4]) | (u32(e[5]) << 16), u32(e[6]) | (u32(e[7]) << 16)};
      st_shared_v4(dst, packed);
    }
  };
  if (kVec && kUnroll) {
#pragma unroll
    for (int it = 0; it < Walk::kSteps; ++it) copy_step(it);
  } else {
    // The element-wise fallback is bound by its loads: one chunk in flight is enough.
#pragma unroll 1
    for (int it = 0; it < Walk::kSteps; ++it) copy_step(it);
  }
}

// Shared -> global copy of one tile, rows < rows_valid and columns < cols_valid only.
template <int kRows, int kCols, int kThreads, bool kVec>
CUFLASH_DEVICE void store_tile(u16* __restrict__ gmem, i64 row_stride, int rows_valid,
                               int cols_valid, u32 smem, int tid) {
  using Walk = TileWalk<kRows, kCols, kThreads>;
  int row_l, chunk_l;
  Walk::Tile::chunk_coords(tid, row_l, chunk_l);
  u16* dst_l = gmem + row_l * row_stride + chunk_l * 8;
  const u32 src_l = smem + Walk::Tile::offset(row_l, chunk_l);
#pragma unroll
  for (int it = 0; it < Walk::kSteps; ++it) {
    int row_it, chunk_it;
    Walk::step_coords(it, row_it, chunk_it);
    if (Walk::kRagged && it * kThreads + tid >= Walk::Tile::kChunks) break;
    const int row = row_l + row_it;
    const int col = (chunk_l + chunk_it) * 8;
    if (row >= rows_valid || col >= cols_valid) continue;
    u32 packed[4];
    ld_shared_v4(packed, src_l + u32(((chunk_it >> 2) * kRows + row_it) * 64));
    u16* dst = dst_l + row_it * row_stride + chunk_it * 8;
    if (kVec) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (col + j < cols_valid) dst[j] = u16(packed[j / 2] >> (16 * (j % 2)));
      }
    }
  }
}

}  // namespace cuflash
