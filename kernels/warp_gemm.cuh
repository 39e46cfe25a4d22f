// cuflash: warp-level matrix products on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// A warp computes kMRep slabs of 16 rows x kN columns. Operands come from swizzled
// shared-memory tiles (tile_load.cuh) through ldmatrix, or, for A, straight from the
// accumulator registers of an earlier product: the C fragment of two neighbouring n8
// tiles is exactly the A fragment of one k16 step, so P and dS never leave registers.
//
// Naming: a tile is stored "rows x k" when the reduction index runs along its rows'
// contiguous columns (Q and K for S = Q K^T), and "k x cols" when it runs down the rows
// (V for O = P V). The ldmatrix lane patterns below cover the three cases.
#pragma once
#include "common.cuh"
#include "tile_load.cuh"

namespace cuflash {

// Per-lane ldmatrix offsets. A lane's offset depends only on its (row, chunk) inside the
// first 16 x 16 block, not on the tile's height, so one set serves every tile.
struct LanePatterns {
  using Offsets = LaneOffsets;
  Offsets a_rows;   // A stored rows x k (non-trans): rows 0-15, chunk +0 | +1
  Offsets b_rows;   // B stored cols x k (non-trans): cols 0-7 | 0-7 | 8-15 | 8-15, chunk +0 | +1;
                    // also A stored k x rows (.trans), with rows and k swapped
  Offsets b_trans;  // B stored k x cols (.trans): k 0-7 | 8-15 | 0-7 | 8-15, chunk +0 | +0 | +1 | +1

  CUFLASH_DEVICE void init(int a_row0, int lane) {
    a_rows = SmemTile<16, 32>::lane_offsets(a_row0 + (lane & 15), lane >> 4);
    b_rows = SmemTile<16, 32>::lane_offsets(((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1);
    b_trans = SmemTile<16, 32>::lane_offsets((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
  }
};

template <int kMRep, int kNTiles>
CUFLASH_DEVICE void zero_acc(float (&acc)[kMRep][kNTiles][4]) {
#pragma unroll
  for (int r = 0; r < kMRep; ++r)
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][n][e] = 0.f;
}

// acc = A B^T over kK: A stored rows x k (this warp's slabs start where `a` points,
// slab r at row 16r), B stored cols x k (every column of the tile, from row b_row0).
template <bool kBf16, int kMRep, int kN, int kK, class TileA, class TileB>
CUFLASH_DEVICE void gemm_rows_rows(float (&acc)[kMRep][kN / 8][4], u32 sA,
                                   const LanePatterns& lp, u32 sB, int b_row0 = 0) {
  zero_acc(acc);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r) ldmatrix_x4(a[r], TileA::ldsm(sA, lp.a_rows, r * 16, 2 * kk));
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      u32 b[4];
      ldmatrix_x4(b, TileB::ldsm(sB, lp.b_rows, b_row0 + nn * 16, 2 * kk));
#pragma unroll
      for (int r = 0; r < kMRep; ++r) {
        mma_16816<kBf16>(acc[r][2 * nn], a[r], b[0], b[1]);
        mma_16816<kBf16>(acc[r][2 * nn + 1], a[r], b[2], b[3]);
      }
    }
  }
}

// C fragments (kMRep x kK/8 n8 tiles of fp32) -> A fragments (kMRep x kK/16 k16 steps of
// packed 16-bit pairs): a[r][kk] = {c[2kk][0,1], c[2kk][2,3], c[2kk+1][0,1], c[2kk+1][2,3]}.
template <bool kBf16, int kMRep, int kK>
CUFLASH_DEVICE void pack_frags(u32 (&a)[kMRep][kK / 16][4], const float (&c)[kMRep][kK / 8][4]) {
#pragma unroll
  for (int r = 0; r < kMRep; ++r)
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float* src = c[r][2 * kk + (j >> 1)];
        a[r][kk][j] = pack2<kBf16>(src[2 * (j & 1)], src[2 * (j & 1) + 1]);
      }
}

// One k16 step of acc += A B: A fragments `a` (kMRep slabs of 16 rows) times rows
// [16 kk, 16 kk + 16) of a tile stored k x cols, columns [col0, col0 + kN), which
// ldmatrix.trans reads as B fragments.
template <bool kBf16, int kMRep, int kN, class TileB>
CUFLASH_DEVICE void mma_b_trans(float (&acc)[kMRep][kN / 8][4], const u32 (&a)[kMRep][4],
                                u32 sB, const LanePatterns& lp, int kk, int col0) {
#pragma unroll
  for (int dd = 0; dd < kN / 16; ++dd) {
    u32 b[4];
    ldmatrix_x4_trans(b, TileB::ldsm(sB, lp.b_trans, kk * 16, col0 / 8 + 2 * dd));
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
      mma_16816<kBf16>(acc[r][2 * dd], a[r], b[0], b[1]);
      mma_16816<kBf16>(acc[r][2 * dd + 1], a[r], b[2], b[3]);
    }
  }
}

// Packed 16-bit pairs with negative halves set to 0 (max with +0, one instruction).
template <bool kBf16>
CUFLASH_DEVICE u32 relu2(u32 x) {
  u32 r;
  if (kBf16) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(0u));
  } else {
    asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(0u));
  }
  return r;
}

// acc += A B over kK, with A in registers as packed A fragments (pack_frags) and B stored
// k x cols: columns [col0, col0 + kN) of the tile. kReluA: A's negative entries count as 0
// (the backward marks dropped probabilities by their sign, dropout.cuh).
template <bool kBf16, int kMRep, int kN, int kK, class TileB, bool kReluA = false>
CUFLASH_DEVICE void gemm_regs_trans(float (&acc)[kMRep][kN / 8][4],
                                    const u32 (&a_in)[kMRep][kK / 16][4], u32 sB,
                                    const LanePatterns& lp, int col0 = 0) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
#pragma unroll
      for (int j = 0; j < 4; ++j) a[r][j] = kReluA ? relu2<kBf16>(a_in[r][kk][j]) : a_in[r][kk][j];
    mma_b_trans<kBf16, kMRep, kN, TileB>(acc, a, sB, lp, kk, col0);
  }
}

// acc += A B over kK, with A stored rows x k (this warp's slabs, as in gemm_rows_rows) and
// B stored k x cols (columns [col0, col0 + kN)).
template <bool kBf16, int kMRep, int kN, int kK, class TileA, class TileB>
CUFLASH_DEVICE void gemm_rows_trans(float (&acc)[kMRep][kN / 8][4], u32 sA, u32 sB,
                                    const LanePatterns& lp, int col0) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r) ldmatrix_x4(a[r], TileA::ldsm(sA, lp.a_rows, r * 16, 2 * kk));
    mma_b_trans<kBf16, kMRep, kN, TileB>(acc, a, sB, lp, kk, col0);
  }
}

// acc = A B over kK, with A stored k x rows (.trans; this warp's rows start at a_row0)
// and B stored k x cols (columns [col0, col0 + kN)).
template <bool kBf16, int kMRep, int kN, int kK, class TileA, class TileB>
CUFLASH_DEVICE void gemm_trans_trans(float (&acc)[kMRep][kN / 8][4], u32 sA, int a_row0,
                                     u32 sB, int col0, const LanePatterns& lp) {
  zero_acc(acc);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
      ldmatrix_x4_trans(a[r], TileA::ldsm(sA, lp.b_rows, kk * 16, (a_row0 + r * 16) / 8));
    }
    mma_b_trans<kBf16, kMRep, kN, TileB>(acc, a, sB, lp, kk, col0);
  }
}

// Stores packed A fragments (pack_frags) into rows [row0, row0 + 16 kMRep) and columns
// [col0, col0 + kK) of a shared tile (col0 a multiple of 16).
template <class Tile, int kMRep, int kK>
CUFLASH_DEVICE void store_packed(u32 sTile, const u32 (&a)[kMRep][kK / 16][4], int row0,
                                 int lane, int col0 = 0) {
#pragma unroll
  for (int r = 0; r < kMRep; ++r)
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = row0 + r * 16 + (lane >> 2) + (j & 1) * 8;
        const int chunk = col0 / 8 + 2 * kk + (j >> 1);
        st_shared_b32(sTile + Tile::offset(row, chunk) + (lane & 3) * 4, a[r][kk][j]);
      }
}

// Stores C fragments (times `factor`, rounded to 16 bits) into rows [row0, row0 + 16 kMRep)
// and columns [col0, col0 + 8 kNTiles) of a shared tile.
template <bool kBf16, class Tile, int kMRep, int kNTiles>
CUFLASH_DEVICE void store_frag(u32 sTile, const float (&acc)[kMRep][kNTiles][4], int row0,
                               int col0, float factor, int lane) {
#pragma unroll
  for (int r = 0; r < kMRep; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r * 16 + (lane >> 2) + h * 8;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        // columns 8n + 2(lane % 4), +1: one 4-byte word of chunk col0/8 + n
        const u32 addr = sTile + Tile::offset(row, col0 / 8 + n) + (lane & 3) * 4;
        st_shared_b32(addr, pack2<kBf16>(acc[r][n][2 * h] * factor, acc[r][n][2 * h + 1] * factor));
      }
    }
  }
}

}  // namespace cuflash
