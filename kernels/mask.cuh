// cuflash: which scores a query may see.
//
// Query row i sees key column j iff j < seqlen_k and
//   causal:  j <= i + off                               (off = seqlen_k - seqlen_q)
//   kLocal:  i + off - window_left <= j <= i + off + window_right
// (bottom-right alignment, as in flash-attn >= 2.1). The host clamps an unbounded side of
// the window to seqlen_k (left) or seqlen_q (right), which is as good as infinite and
// keeps every sum in int range; with causal it passes window_right <= 0. Hidden scores
// become -inf, so the softmax gives them weight exactly 0.
#pragma once
#include "common.cuh"

namespace cuflash {

template <bool kCausal, bool kLocal = false>
struct Mask {
  int seqlen_q, seqlen_k;
  int window_left, window_right;  // kLocal only

  static constexpr bool kRightBound = kCausal || kLocal;

  CUFLASH_DEVICE int offset() const { return seqlen_k - seqlen_q; }

  // Last key column that row `row` may see (can be negative: the row sees nothing).
  CUFLASH_DEVICE int last_key(int row) const {
    if (kLocal) return min(row + offset() + window_right, seqlen_k - 1);
    return kCausal ? min(row + offset(), seqlen_k - 1) : seqlen_k - 1;
  }

  // First key column that row `row` may see (0 unless the window bounds it on the left).
  CUFLASH_DEVICE int first_key(int row) const {
    return kLocal ? max(row + offset() - window_left, 0) : 0;
  }

  // Key tiles [0, n_block_max) hold every key seen by rows [m0, m0 + block_m).
  template <int kBlockN>
  CUFLASH_DEVICE int n_block_max(int m0, int block_m) const {
    const int row_last = min(m0 + block_m, seqlen_q) - 1;
    const int key_last = last_key(row_last);
    return key_last < 0 ? 0 : key_last / kBlockN + 1;
  }

  // Key tiles [n_block_min, ...) hold every key seen by rows [m0, ...).
  template <int kBlockN>
  CUFLASH_DEVICE int n_block_min(int m0) const {
    return kLocal ? first_key(m0) / kBlockN : 0;
  }

  // Whether key tile n needs an element-wise mask for rows [m0, m0 + kBlockM): it runs
  // past seqlen_k, past the last key that the tile's first row may see, or (kLocal) starts
  // before the first key that its last row may see.
  template <int kBlockN, int kBlockM>
  CUFLASH_DEVICE bool tile_needs_mask(int n, int m0) const {
    const int key_end = (n + 1) * kBlockN - 1;
    if (key_end >= seqlen_k) return true;
    if (kRightBound && key_end > m0 + offset() + (kLocal ? window_right : 0)) return true;
    return kLocal && n * kBlockN < min(m0 + kBlockM, seqlen_q) - 1 + offset() - window_left;
  }

  // Query tiles [m_block_min, m_block_end) hold every query that sees a key of the tile
  // [n0, n0 + kBlockN): query i sees key n0 only from i = n0 - off - right on (right = 0
  // when causal), and (kLocal) key n0 + kBlockN - 1 only up to i = n0 + kBlockN - 1 - off
  // + left.
  template <int kBlockM>
  CUFLASH_DEVICE int m_block_min(int n0) const {
    if (!kRightBound) return 0;
    return max(0, n0 - offset() - (kLocal ? window_right : 0)) / kBlockM;
  }
  template <int kBlockM, int kBlockN>
  CUFLASH_DEVICE int m_block_end(int n0) const {
    const int m_blocks = (seqlen_q + kBlockM - 1) / kBlockM;
    if (!kLocal) return m_blocks;
    const int last_query = n0 + kBlockN - 1 - offset() + window_left;
    return last_query < 0 ? 0 : min(m_blocks, last_query / kBlockM + 1);
  }

  // Whether (row, col) is hidden, for rows that have a last_key `limit` and first_key `lo`.
  CUFLASH_DEVICE static bool hidden(int col, int lo, int limit) {
    return col > limit || (kLocal && col < lo);
  }

  CUFLASH_DEVICE bool hidden_at(int row, int col) const {
    return hidden(col, first_key(row), last_key(row));
  }

  // s: one warp's scores, kMRep slabs of 16 rows x kBlockN columns, in mma C layout; hidden
  // ones become `fill` (-inf for scores; 0 for probabilities).
  // row0: first row of this warp's slab 0; col0: first key of the tile.
  template <int kMRep, int kNTiles>
  CUFLASH_DEVICE void apply(float (&s)[kMRep][kNTiles][4], int row0, int col0, int lane,
                            float fill = neg_inf()) const {
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + r * 16 + (lane >> 2) + h * 8;
        const int limit = last_key(row), lo = first_key(row);
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = col0 + n * 8 + (lane & 3) * 2 + e;
            if (hidden(col, lo, limit)) s[r][n][2 * h + e] = fill;
          }
        }
      }
    }
  }

  // The same on transposed scores (rows are keys, columns are queries), as the backward
  // pass holds them. key0: first key of this warp's slab 0; query0: first query of the tile.
  template <int kNRep, int kMTiles>
  CUFLASH_DEVICE void apply_transposed(float (&st)[kNRep][kMTiles][4], int key0, int query0,
                                       int lane, float fill = neg_inf()) const {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int query = query0 + m * 8 + (lane & 3) * 2 + e;
        const int limit = last_key(query), lo = first_key(query);
#pragma unroll
        for (int r = 0; r < kNRep; ++r) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (hidden(key0 + r * 16 + (lane >> 2) + h * 8, lo, limit)) {
              st[r][m][2 * h + e] = fill;
            }
          }
        }
      }
    }
  }
};

}  // namespace cuflash
