// cuflash: warp-level matrix products on tensor cores (mma.sync m16n8k16 for fp16/bf16,
// m16n8k8 for tf32, fp32 accumulate; kPrec in common.cuh).
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

// ldmatrix of an operand; tf32 operands (float32 in shared memory) are rounded here: an
// x4 ldmatrix of a float32 tile gives a lane the elements (row g, k t) of four 8 x 4
// blocks, which is the tf32 fragment layout, with k running over 8 elements = 16 units.
template <int kPrec>
CUFLASH_DEVICE void ldsm_operand(u32 (&r)[4], u32 addr) {
  ldmatrix_x4(r, addr);
  if (kPrec == kPrecTF32) {
#pragma unroll
    for (int j = 0; j < 4; ++j) r[j] = to_tf32(__uint_as_float(r[j]));
  }
}

// float32 elements of a tile laid out in 16-bit units (a 16-byte chunk holds four), as
// the tf32 paths read and write them one by one. Every address is one of two per-lane
// offsets plus a compile-time constant, as with LaneOffsets for ldmatrix, so unrolled
// loops keep no address registers.
template <class Tile>
struct F32Lanes {
  // Column-walking access, k down the rows: the lane touches rows R + 2t + e (R % 8 == 0,
  // e in {0, 1}) and column C + 8m + g (C % 16 == 0, m in {0, 1}): B (k x cols) operands
  // and A operands stored k x rows.
  static CUFLASH_DEVICE u32 k_rows(int m) {
    const int lane = lane_id(), g = lane >> 2, t = lane & 3;
    return u32(128 * t + (g & 3) * 4 + 16 * ((2 * m + (g >> 2)) ^ t));
  }
  static CUFLASH_DEVICE u32 k_rows_at(u32 base, const u32 (&lo)[2], int R, int e, int C, int m) {
    return base + lo[m] + u32(((C >> 4) * Tile::kRowCount + R + e) * 64);
  }
  // Fragment-walking access (C and packed A fragments): rows R + g (+ 8), columns
  // C + 8m + 2t, +1 as one 8-byte pair (R % 16 == 0, C % 16 == 0).
  static CUFLASH_DEVICE u32 frag(int m) {
    const int lane = lane_id(), g = lane >> 2, t = lane & 3;
    return u32(64 * g + 16 * ((2 * m + (t >> 1)) ^ ((g >> 1) & 3)) + (t & 1) * 8);
  }
  static CUFLASH_DEVICE u32 frag_at(u32 base, const u32 (&lo)[2], int R, int C, int m) {
    return base + lo[m] + u32(((C >> 4) * Tile::kRowCount + R) * 64);
  }
};

// acc = A B^T over kK (16-bit units of the tiles' rows: a float32 tile's k is kK / 2): A
// stored rows x k (this warp's slabs start where `a` points, slab r at row 16r), B stored
// cols x k (every column of the tile, from row b_row0).
template <int kPrec, int kMRep, int kN, int kK, class TileA, class TileB>
CUFLASH_DEVICE void gemm_rows_rows(float (&acc)[kMRep][kN / 8][4], u32 sA,
                                   const LanePatterns& lp, u32 sB, int b_row0 = 0) {
  zero_acc(acc);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
      ldsm_operand<kPrec>(a[r], TileA::ldsm(sA, lp.a_rows, r * 16, 2 * kk));
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      u32 b[4];
      ldsm_operand<kPrec>(b, TileB::ldsm(sB, lp.b_rows, b_row0 + nn * 16, 2 * kk));
#pragma unroll
      for (int r = 0; r < kMRep; ++r) {
        mma_step<kPrec>(acc[r][2 * nn], a[r], b[0], b[1]);
        mma_step<kPrec>(acc[r][2 * nn + 1], a[r], b[2], b[3]);
      }
    }
  }
}

// C fragments (kMRep x kK/8 n8 tiles of fp32) -> A fragments of the k steps over those
// columns. 16-bit: a[r][kk] = {c[2kk][0,1], c[2kk][2,3], c[2kk+1][0,1], c[2kk+1][2,3]}
// as packed pairs. tf32: a[r][kk] = {c[kk][0], c[kk][2], c[kk][1], c[kk][3]}, kept as
// float32 bits (gemm_regs_trans rounds them to tf32 where it uses them, so the backward can
// still read P at full precision for dS), which puts
// the lane's columns 2t and 2t + 1 at the fragment's k = t and t + 4: the k order inside
// each step is permuted, and every B operand that meets these fragments is read in the
// same order (rows 2t and 2t + 1; mma_b_trans, gemm_trans_trans).
template <int kPrec, int kMRep, int kK>
CUFLASH_DEVICE void pack_frags(u32 (&a)[kMRep][kK / kKStep<kPrec>][4],
                               const float (&c)[kMRep][kK / 8][4]) {
#pragma unroll
  for (int r = 0; r < kMRep; ++r)
#pragma unroll
    for (int kk = 0; kk < kK / kKStep<kPrec>; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (kPrec == kPrecTF32) {
          a[r][kk][j] = __float_as_uint(c[r][kk][(j >> 1) | ((j & 1) << 1)]);
        } else {
          const float* src = c[r][2 * kk + (j >> 1)];
          a[r][kk][j] = pack2<kPrec == kPrecBF16>(src[2 * (j & 1)], src[2 * (j & 1) + 1]);
        }
      }
}

// An A fragment register with its negative entries set to 0 (one max instruction for a
// packed pair): the backward marks dropped probabilities by their sign (dropout.cuh).
template <int kPrec>
CUFLASH_DEVICE u32 relu_frag(u32 x) {
  u32 r;
  if (kPrec == kPrecTF32) {
    r = __float_as_uint(fmaxf(__uint_as_float(x), 0.f));
  } else if (kPrec == kPrecBF16) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(0u));
  } else {
    asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(0u));
  }
  return r;
}

// One k step of acc += A B: A fragments `a` (kMRep slabs of 16 rows) times rows
// [kk * step, (kk + 1) * step) of a tile stored k x cols, columns [col0, col0 + kN):
// 16-bit, by ldmatrix.trans; tf32, element by element, rows 2t and 2t + 1 of the step
// (the k order of pack_frags).
template <int kPrec, int kMRep, int kN, class TileB>
CUFLASH_DEVICE void mma_b_trans(float (&acc)[kMRep][kN / 8][4], const u32 (&a)[kMRep][4],
                                u32 sB, const LanePatterns& lp, int kk, int col0) {
  if constexpr (kPrec == kPrecTF32) {
    // (col0 % 16 == 0: column blocks of 16)
    using L = F32Lanes<TileB>;
    const u32 lo[2] = {L::k_rows(0), L::k_rows(1)};
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
      const int C = col0 + (n >> 1) * 16;
      const u32 b0 = to_tf32(__uint_as_float(ld_shared_b32(L::k_rows_at(sB, lo, kk * 8, 0, C, n & 1))));
      const u32 b1 = to_tf32(__uint_as_float(ld_shared_b32(L::k_rows_at(sB, lo, kk * 8, 1, C, n & 1))));
#pragma unroll
      for (int r = 0; r < kMRep; ++r) mma_1688_tf32(acc[r][n], a[r], b0, b1);
    }
  } else {
#pragma unroll
    for (int dd = 0; dd < kN / 16; ++dd) {
      u32 b[4];
      ldmatrix_x4_trans(b, TileB::ldsm(sB, lp.b_trans, kk * 16, col0 / 8 + 2 * dd));
#pragma unroll
      for (int r = 0; r < kMRep; ++r) {
        mma_step<kPrec>(acc[r][2 * dd], a[r], b[0], b[1]);
        mma_step<kPrec>(acc[r][2 * dd + 1], a[r], b[2], b[3]);
      }
    }
  }
}

// acc += A B over kK (elements), with A in registers as packed A fragments (pack_frags;
// tf32: rounded here) and B stored k x cols: columns [col0, col0 + kN) of the tile.
// kReluA: A's negative entries count as 0 (relu_frag).
template <int kPrec, int kMRep, int kN, int kK, class TileB, bool kReluA = false>
CUFLASH_DEVICE void gemm_regs_trans(float (&acc)[kMRep][kN / 8][4],
                                    const u32 (&a_in)[kMRep][kK / kKStep<kPrec>][4], u32 sB,
                                    const LanePatterns& lp, int col0 = 0) {
#pragma unroll
  for (int kk = 0; kk < kK / kKStep<kPrec>; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const u32 x = kReluA ? relu_frag<kPrec>(a_in[r][kk][j]) : a_in[r][kk][j];
        a[r][j] = kPrec == kPrecTF32 ? to_tf32(__uint_as_float(x)) : x;
      }
    mma_b_trans<kPrec, kMRep, kN, TileB>(acc, a, sB, lp, kk, col0);
  }
}

// acc += A B over kK, with A stored rows x k (this warp's slabs, as in gemm_rows_rows) and
// B stored k x cols (columns [col0, col0 + kN)). 16-bit only (the kSwap tiles).
template <int kPrec, int kMRep, int kN, int kK, class TileA, class TileB>
CUFLASH_DEVICE void gemm_rows_trans(float (&acc)[kMRep][kN / 8][4], u32 sA, u32 sB,
                                    const LanePatterns& lp, int col0) {
  static_assert(kPrec != kPrecTF32, "no tf32 tiles swap P and dS through shared memory");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r) ldmatrix_x4(a[r], TileA::ldsm(sA, lp.a_rows, r * 16, 2 * kk));
    mma_b_trans<kPrec, kMRep, kN, TileB>(acc, a, sB, lp, kk, col0);
  }
}

// acc = A B over kK (elements), with A stored k x rows (.trans; this warp's rows start at
// a_row0) and B stored k x cols (columns [col0, col0 + kN)).
template <int kPrec, int kMRep, int kN, int kK, class TileA, class TileB>
CUFLASH_DEVICE void gemm_trans_trans(float (&acc)[kMRep][kN / 8][4], u32 sA, int a_row0,
                                     u32 sB, int col0, const LanePatterns& lp) {
  zero_acc(acc);
#pragma unroll
  for (int kk = 0; kk < kK / kKStep<kPrec>; ++kk) {
    u32 a[kMRep][4];
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
      if constexpr (kPrec == kPrecTF32) {
        // element (row, k) is tile element (k, row); k order as in pack_frags
        using L = F32Lanes<TileA>;
        const u32 lo[2] = {L::k_rows(0), L::k_rows(1)};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          a[r][j] = to_tf32(__uint_as_float(ld_shared_b32(
              L::k_rows_at(sA, lo, kk * 8, j >> 1, a_row0 + r * 16, j & 1))));
        }
      } else {
        ldmatrix_x4_trans(a[r], TileA::ldsm(sA, lp.b_rows, kk * 16, (a_row0 + r * 16) / 8));
      }
    }
    mma_b_trans<kPrec, kMRep, kN, TileB>(acc, a, sB, lp, kk, col0);
  }
}

// Stores packed A fragments (pack_frags) into rows [row0, row0 + 16 kMRep) and columns
// [col0, col0 + kK) of a shared tile (col0 a multiple of 16): the tile then holds the
// values in their natural order (tf32: undoing pack_frags' permutation).
template <int kPrec, class Tile, int kMRep, int kK>
CUFLASH_DEVICE void store_packed(u32 sTile, const u32 (&a)[kMRep][kK / kKStep<kPrec>][4],
                                 int row0, int lane, int col0 = 0) {
#pragma unroll
  for (int r = 0; r < kMRep; ++r)
#pragma unroll
    for (int kk = 0; kk < kK / kKStep<kPrec>; ++kk) {
      if constexpr (kPrec == kPrecTF32) {
        // a = {(g, 2t), (g + 8, 2t), (g, 2t + 1), (g + 8, 2t + 1)} of this 8-column step
        using L = F32Lanes<Tile>;
        const u32 lo[2] = {L::frag(0), L::frag(1)};
        const int C = col0 + (kk >> 1) * 16;
        st_shared_v2(L::frag_at(sTile, lo, row0 + r * 16, C, kk & 1), a[r][kk][0], a[r][kk][2]);
        st_shared_v2(L::frag_at(sTile, lo, row0 + r * 16 + 8, C, kk & 1), a[r][kk][1],
                     a[r][kk][3]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = row0 + r * 16 + (lane >> 2) + (j & 1) * 8;
          const int chunk = col0 / 8 + 2 * kk + (j >> 1);
          st_shared_b32(sTile + Tile::offset(row, chunk) + (lane & 3) * 4, a[r][kk][j]);
        }
      }
    }
}

// Stores C fragments (times `factor`, rounded to the element type) into rows
// [row0, row0 + 16 kMRep) and columns [col0, col0 + 8 kNTiles) of a shared tile.
template <int kPrec, class Tile, int kMRep, int kNTiles>
CUFLASH_DEVICE void store_frag(u32 sTile, const float (&acc)[kMRep][kNTiles][4], int row0,
                               int col0, float factor, int lane) {
#pragma unroll
  for (int r = 0; r < kMRep; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r * 16 + (lane >> 2) + h * 8;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        const float x = acc[r][n][2 * h] * factor, y = acc[r][n][2 * h + 1] * factor;
        if constexpr (kPrec == kPrecTF32) {
          using L = F32Lanes<Tile>;
          const u32 lo[2] = {L::frag(0), L::frag(1)};
          st_shared_v2(L::frag_at(sTile, lo, row0 + r * 16 + h * 8, col0 + (n >> 1) * 16, n & 1),
                       __float_as_uint(x), __float_as_uint(y));
        } else {
          // columns 8n + 2(lane % 4), +1: one 4-byte word of chunk col0/8 + n
          const u32 addr = sTile + Tile::offset(row, col0 / 8 + n) + (lane & 3) * 4;
          st_shared_b32(addr, pack2<kPrec == kPrecBF16>(x, y));
        }
      }
    }
  }
}

}  // namespace cuflash
