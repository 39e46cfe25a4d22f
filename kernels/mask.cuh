// cuflash: which scores a query may see.
//
// Query row i sees key column j iff j < seqlen_k and, when causal, j <= i + seqlen_k - seqlen_q
// (bottom-right alignment, as in flash-attn >= 2.1). Hidden scores become -inf, so the
// softmax gives them weight exactly 0.
#pragma once
#include "common.cuh"

namespace cuflash {

template <bool kCausal>
struct Mask {
  int seqlen_q, seqlen_k;

  // Last key column that row `row` may see (can be negative: the row sees nothing).
  CUFLASH_DEVICE int last_key(int row) const {
    return kCausal ? min(row + seqlen_k - seqlen_q, seqlen_k - 1) : seqlen_k - 1;
  }

  // Key tiles [0, n_block_max) hold every key seen by rows [m0, m0 + block_m).
  template <int kBlockN>
  CUFLASH_DEVICE int n_block_max(int m0, int block_m) const {
    const int row_last = min(m0 + block_m, seqlen_q) - 1;
    const int key_last = last_key(row_last);
    return key_last < 0 ? 0 : key_last / kBlockN + 1;
  }

  // Whether key tile n needs an element-wise mask for rows [m0, m0 + block_m): it runs
  // past seqlen_k, or (causal) past the last key that the tile's first row may see.
  template <int kBlockN>
  CUFLASH_DEVICE bool tile_needs_mask(int n, int m0) const {
    const int key_end = (n + 1) * kBlockN - 1;
    return key_end >= seqlen_k || (kCausal && key_end > m0 + seqlen_k - seqlen_q);
  }

  // Query tiles [m_block_min, ...) hold every query that sees a key of tile [n0, ...):
  // with causal, query i sees key n0 only from i = n0 - (seqlen_k - seqlen_q) on.
  template <int kBlockM>
  CUFLASH_DEVICE int m_block_min(int n0) const {
    return kCausal ? max(0, n0 - (seqlen_k - seqlen_q)) / kBlockM : 0;
  }

  // s: one warp's scores, kMRep slabs of 16 rows x kBlockN columns, in mma C layout.
  // row0: first row of this warp's slab 0; col0: first key of the tile.
  template <int kMRep, int kNTiles>
  CUFLASH_DEVICE void apply(float (&s)[kMRep][kNTiles][4], int row0, int col0, int lane) const {
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + r * 16 + (lane >> 2) + h * 8;
        const int limit = last_key(row);
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = col0 + n * 8 + (lane & 3) * 2 + e;
            if (col > limit) s[r][n][2 * h + e] = neg_inf();
          }
        }
      }
    }
  }

  // The same on transposed scores (rows are keys, columns are queries), as the backward
  // pass holds them. key0: first key of this warp's slab 0; query0: first query of the tile.
  template <int kNRep, int kMTiles>
  CUFLASH_DEVICE void apply_transposed(float (&st)[kNRep][kMTiles][4], int key0, int query0,
                                       int lane) const {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int limit = last_key(query0 + m * 8 + (lane & 3) * 2 + e);
#pragma unroll
        for (int r = 0; r < kNRep; ++r) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (key0 + r * 16 + (lane >> 2) + h * 8 > limit) st[r][m][2 * h + e] = neg_inf();
          }
        }
      }
    }
  }
};

}  // namespace cuflash
