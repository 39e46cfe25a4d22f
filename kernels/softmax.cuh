// cuflash: the online softmax (Milakov & Gimelshein 2018; Rabe & Staats 2021;
// FlashAttention-2, Dao 2023). docs/algorithm.md derives why the rescale is exact.
//
// Scores arrive already multiplied by scale * log2(e), so every exponential is a single
// exp2 (ex2.approx) and m_i, the running row max, is kept in the same base-2 units.
// Each thread owns two rows per 16-row slab (lane/4 and lane/4 + 8); the four lanes of a
// quad share those rows, so a row max is a quad reduction. The row sum l_i stays a
// per-thread partial sum until finalize(): it is only needed once, at the end.
#pragma once
#include "common.cuh"

namespace cuflash {

template <int kMRep>
struct OnlineSoftmax {
  float m_i[kMRep][2];  // running row max (log2 units), -inf until the row sees a key
  float l_i[kMRep][2];  // this thread's part of the running row sum

  CUFLASH_DEVICE void init() {
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m_i[r][h] = neg_inf();
        l_i[r][h] = 0.f;
      }
    }
  }

  // One key tile: m_new = max(m_i, rowmax(s)); alpha = exp2(m_i - m_new) rescales l_i and
  // o_acc; s becomes p = exp2(s - m_new) and is added to l_i.
  // kScaled: s and m_i are in `units` (> 0) of log2 units, and every exp2 multiplies by it.
  template <bool kScaled = false, int kNTiles, int kDTiles>
  CUFLASH_DEVICE void update(float (&s)[kMRep][kNTiles][4], float (&o_acc)[kMRep][kDTiles][4],
                             float units = 1.f) {
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float alpha = update_row<kScaled>(s, r, h, units);
        rescale_row(o_acc, r, h, alpha);
      }
    }
  }

  // update() in two halves, for kernels whose o_acc is still being written (by an
  // asynchronous product) while the next tile's scores are exponentiated: the scores and
  // m_i, l_i first, giving each row's alpha; then rescale(o_acc, alpha).
  template <bool kScaled = false, int kNTiles>
  CUFLASH_DEVICE void update_scores(float (&s)[kMRep][kNTiles][4], float (&alpha)[kMRep][2],
                                    float units = 1.f) {
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) alpha[r][h] = update_row<kScaled>(s, r, h, units);
  }
  template <int kDTiles>
  CUFLASH_DEVICE static void rescale(float (&o_acc)[kMRep][kDTiles][4],
                                     const float (&alpha)[kMRep][2]) {
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) rescale_row(o_acc, r, h, alpha[r][h]);
  }

  // Row half h of slab r: m_i, l_i and the scores; returns alpha.
  template <bool kScaled, int kNTiles>
  CUFLASH_DEVICE float update_row(float (&s)[kMRep][kNTiles][4], int r, int h, float units) {
    const float u = kScaled ? units : 1.f;
    float m_new = m_i[r][h];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      m_new = fmaxf(m_new, fmaxf(s[r][n][2 * h], s[r][n][2 * h + 1]));
    }
    m_new = quad_max(m_new);
    // A row that has seen only masked keys has m_new = -inf; measuring from 0 instead
    // keeps exp2(-inf - (-inf)) = NaN out: its p and alpha are then exactly 0.
    const float m_ref = m_new == neg_inf() ? 0.f : m_new;
    const float alpha = exp2_approx(kScaled ? (m_i[r][h] - m_ref) * u : m_i[r][h] - m_ref);
    const float m_scaled = m_ref * u;
    m_i[r][h] = m_new;
    float row_sum = 0.f;
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2_approx(kScaled ? fmaf(s[r][n][2 * h + e], u, -m_scaled)
                                            : s[r][n][2 * h + e] - m_ref);
        s[r][n][2 * h + e] = p;
        row_sum += p;
      }
    }
    l_i[r][h] = l_i[r][h] * alpha + row_sum;
    return alpha;
  }

  template <int kDTiles>
  CUFLASH_DEVICE static void rescale_row(float (&o_acc)[kMRep][kDTiles][4], int r, int h,
                                         float alpha) {
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      o_acc[r][d][2 * h] *= alpha;
      o_acc[r][d][2 * h + 1] *= alpha;
    }
  }

  // Ends the row: o_acc *= out_scale / l_i, and lse = ln(sum exp(s)) in natural-log units
  // (m_i times `units` as in update). out_scale: dropout's 1 / (1 - p), else 1.
  // A row that saw no key (l_i == 0) gets output 0 and lse = -inf.
  template <int kDTiles>
  CUFLASH_DEVICE void finalize(float (&o_acc)[kMRep][kDTiles][4], float (&lse)[kMRep][2],
                               float units = 1.f, float out_scale = 1.f) {
#pragma unroll
    for (int r = 0; r < kMRep; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float l = quad_sum(l_i[r][h]);
        const bool empty = !(l > 0.f);
        const float inv_l = empty ? 0.f : out_scale / l;
        lse[r][h] = empty ? neg_inf() : fmaf(m_i[r][h], units, log2_approx(l)) * kLn2;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          o_acc[r][d][2 * h] *= inv_l;
          o_acc[r][d][2 * h + 1] *= inv_l;
        }
      }
    }
  }
};

}  // namespace cuflash
