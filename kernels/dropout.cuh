// cuflash: dropout on the probabilities, P -> P o Z / (1 - p), with the keep mask Z a pure
// function of (seed, batch, head, i, j), so the backward pass regenerates it instead of
// storing it. cuflash/_dropout.py is the same definition in NumPy (and the tests compare
// the two); docs/options.md gives the math.
//
// Philox4x32-7 (Salmon et al., SC 2011), keyed by the 64-bit seed, turns one counter into
// four 32-bit words = eight 16-bit numbers; score (i, j) is kept iff its number is at least
// `threshold` = round(p * 65536). The eight numbers of one counter are the eight scores that
// one lane holds in the mma accumulator layout of a 16 x 16 block (rows g, g + 8; columns
// 2t, 2t + 1, 2t + 8, 2t + 9, for lane = 4g + t):
//   counter = (4 * (j / 16) + (j % 8) / 2,  i - (i & 8),  batch * heads + head,  0)
//   number  = 16-bit half (j & 1) of word 2 * ((i >> 3) & 1) + ((j >> 3) & 1)
// so the forward pass (rows = queries) needs one Philox call per eight scores, and the
// backward pass, which holds the scores transposed (rows = keys), one per four.
#pragma once
#include "common.cuh"

namespace cuflash {

// Philox4x32-R: R rounds of two 32 x 32 -> 64-bit products and a key schedule. Dropout
// takes R = 7, the fewest rounds that Salmon et al. found to pass BigCrush (FlashAttention-2
// uses 7 as well); 10 adds a safety margin at 10/7 of the cost (docs/options.md).
constexpr int kPhiloxRounds = 7;
template <int kRounds>
CUFLASH_DEVICE void philox4x32(u32 (&c)[4], u32 key0, u32 key1) {
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    // (high and low halves apart: the 64-bit product made ptxas add a zero to each
    // high half, one dependent instruction a product more)
    const u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    const u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    const u32 c1 = c[1], c3 = c[3];
    c[0] = hi1 ^ c1 ^ key0;
    c[1] = lo1;
    c[2] = hi0 ^ c3 ^ key1;
    c[3] = lo0;
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
}

// The dropout of one (batch, head), in the kDropout kernels: options kernels with this code
// on top (kEnabled); the other kernels hold the empty Dropout<false> below, which carries
// none of it (not even its fields: unused ones in the main loop's struct cost the forward
// kernel 5% more instructions). Threshold 0 (p = 0) is off.
template <bool kEnabled>
struct Dropout {
  // keep iff the 16-bit number >= threshold (<= 65535): held as threshold << 16, so that a
  // word's high half compares whole and its low half after one shift
  u32 threshold_hi;
  u32 seed_lo, seed_hi;
  u32 bh;         // batch * heads + head (the counter's third word)

  static CUFLASH_DEVICE Dropout make(u32 threshold, u64 seed, u32 bh) {
    return Dropout{threshold << 16, u32(seed), u32(seed >> 32), bh};
  }

  CUFLASH_DEVICE bool active() const { return threshold_hi != 0u; }

  // The same dropout for query head `head` of this batch element (this one: head 0).
  CUFLASH_DEVICE Dropout for_head(int head) const {
    Dropout d = *this;
    d.bh += u32(head);
    return d;
  }

  CUFLASH_DEVICE void numbers(u32 (&w)[4], u32 c0, u32 c1) const {
    w[0] = c0;
    w[1] = c1;
    w[2] = bh;
    w[3] = 0u;
    philox4x32<kPhiloxRounds>(w, seed_lo, seed_hi);
  }
  // (w >> 16 >= t iff w >= t << 16; the low half likewise, shifted up first)
  CUFLASH_DEVICE bool keep(u32 word, int half) const {
    return (half ? word : word << 16) >= threshold_hi;
  }
  // A dropped score becomes 0, or with kNegate -x (the backward keeps P and marks the
  // drop by the sign: P >= 0).
  template <bool kNegate>
  static CUFLASH_DEVICE void drop(float& x) {
    x = kNegate ? -x : 0.f;
  }

  // Scores with queries as rows (mma C layout, kMRep slabs of 16 rows x kNTiles n8 tiles):
  // row0, the first query of slab 0, and col0, the first key, are multiples of 16.
  template <bool kNegate, int kMRep, int kNTiles>
  CUFLASH_DEVICE void apply(float (&s)[kMRep][kNTiles][4], int row0, int col0, int lane) const {
    static_assert(kNTiles % 2 == 0, "whole 16-key blocks");
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
#pragma unroll
      for (int nn = 0; nn < kNTiles / 2; ++nn) {
        u32 w[4];
        numbers(w, u32(col0 / 16 + nn) * 4u + u32(lane & 3), u32(row0 + r * 16 + (lane >> 2)));
#pragma unroll
        for (int half_tile = 0; half_tile < 2; ++half_tile)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            // element e: row g + 8 (e >> 1), column 2t + (e & 1) of n8 tile 2 nn + half_tile
            if (!keep(w[2 * (e >> 1) + half_tile], e & 1)) drop<kNegate>(s[r][2 * nn + half_tile][e]);
          }
      }
  }

  // Scores with keys as rows (the backward pass's S^T: kNRep slabs of 16 keys x kMTiles n8
  // tiles of queries): key0 and query0 are multiples of 16.
  template <bool kNegate, int kNRep, int kMTiles>
  CUFLASH_DEVICE void apply_transposed(float (&st)[kNRep][kMTiles][4], int key0, int query0,
                                       int lane) const {
    static_assert(kMTiles % 2 == 0, "whole 16-query blocks");
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < kNRep; ++r)
#pragma unroll
      for (int mm = 0; mm < kMTiles / 2; ++mm)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          // query i = query0 + 16 mm + 2t + e (+ 8), keys key0 + 16 r + g (+ 8)
          u32 w[4];
          numbers(w, u32(key0 / 16 + r) * 4u + u32(g >> 1), u32(query0 + mm * 16 + 2 * t + e));
#pragma unroll
          for (int half_tile = 0; half_tile < 2; ++half_tile)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if (!keep(w[2 * half_tile + h], g & 1)) drop<kNegate>(st[r][2 * mm + half_tile][2 * h + e]);
            }
        }
  }

  // apply_transposed in two halves, for kernels short of registers where the scores are
  // live: the keep mask as bits (bit (r kMTiles + m) 4 + e for entry [r][m][e], set =
  // kept), computed before the scores arrive, with half the generator calls (the lanes of
  // a pair share theirs; all 32 lanes must call it); then drop_transposed on the scores.
  template <int kNRep, int kMTiles>
  CUFLASH_DEVICE u32 keep_bits_transposed(int key0, int query0, int lane) const {
    static_assert(kMTiles % 2 == 0 && kNRep * kMTiles * 4 <= 32, "one 32-bit mask");
    const int g = lane >> 2, t = lane & 3, mine = g & 1;
    u32 bits = 0u;
#pragma unroll
    for (int r = 0; r < kNRep; ++r)
#pragma unroll
      for (int mm = 0; mm < kMTiles / 2; ++mm) {
        // lanes g and g ^ 1 need the same two counters (queries 2t and 2t + 1): each
        // generates one, and they swap the words
        u32 w[4], other[4];
        numbers(w, u32(key0 / 16 + r) * 4u + u32(g >> 1), u32(query0 + mm * 16 + 2 * t + mine));
#pragma unroll
        for (int i = 0; i < 4; ++i) other[i] = __shfl_xor_sync(0xffffffffu, w[i], 4);
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int half_tile = 0; half_tile < 2; ++half_tile)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int i = 2 * half_tile + h;
              const u32 word = e == mine ? w[i] : other[i];
              const int bit = (r * kMTiles + 2 * mm + half_tile) * 4 + 2 * h + e;
              if (keep(word, g & 1)) bits |= 1u << bit;
            }
      }
    return bits;
  }
  template <int kNRep, int kMTiles>
  static CUFLASH_DEVICE void drop_transposed(float (&st)[kNRep][kMTiles][4], u32 bits) {
#pragma unroll
    for (int r = 0; r < kNRep; ++r)
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!((bits >> ((r * kMTiles + m) * 4 + e)) & 1u)) drop<true>(st[r][m][e]);
        }
  }
};

template <>
struct Dropout<false> {
  static CUFLASH_DEVICE Dropout make(u32, u64, u32) { return Dropout{}; }
  CUFLASH_DEVICE constexpr bool active() const { return false; }
  CUFLASH_DEVICE Dropout for_head(int) const { return *this; }
  template <bool kNegate, int kMRep, int kNTiles>
  CUFLASH_DEVICE void apply(float (&)[kMRep][kNTiles][4], int, int, int) const {}
  template <bool kNegate, int kNRep, int kMTiles>
  CUFLASH_DEVICE void apply_transposed(float (&)[kNRep][kMTiles][4], int, int, int) const {}
};

}  // namespace cuflash
