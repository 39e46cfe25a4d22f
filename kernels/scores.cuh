// cuflash: raw dot products q.k -> scores, as the softmax uses them.
//
//   plain:     s = scale * q.k
//   softcap c: s = c * tanh(scale * q.k / c)
//   ALiBi:     s -= slope * |i + seqlen_k - seqlen_q - j|
// in log2 units (times log2(e): the softmax works in base 2), or with a softcap in units
// of c * log2(e) (see ScoreMod). The options are run-time values of the kOptions kernels:
// a plain kernel has none of this code. The backward pass also needs the softcap's
// derivative, d s / d (scale q.k) = 1 - tanh^2, which multiplies dS.
#pragma once
#include "common.cuh"

namespace cuflash {

CUFLASH_DEVICE float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh for the softcap. For 16-bit inputs the special-function unit's tanh.approx.f32 (one
// instruction; relative error about 2^-11, the size of an fp16 rounding of the capped
// score). kAccurate (float32 inputs, whose tf32 products are about that accurate
// themselves) or CUFLASH_TANH_ACCURATE: relative error about 1e-6, from an odd Taylor
// polynomial below |y| = 1/8 and 1 - 2 / (1 + e^(2y)) above (two special-function
// instructions, ex2 and rcp; e^(2y) overflows to +inf for large y, which gives 1).
template <bool kAccurate>
CUFLASH_DEVICE float tanh_softcap(float y) {
#ifdef CUFLASH_TANH_ACCURATE
  constexpr bool kPoly = true;
#else
  constexpr bool kPoly = kAccurate;
#endif
  if constexpr (kPoly) {
      const float y2 = y * y;
    const float poly =
        y * fmaf(y2, fmaf(y2, fmaf(y2, -17.f / 315.f, 2.f / 15.f), -1.f / 3.f), 1.f);
    const float expo = 1.f - 2.f * rcp_approx(1.f + exp2_approx(y * (2.f * kLog2e)));
    return fabsf(y) < 0.125f ? poly : expo;
  } else {
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(y));
    return t;
  }
}

// With a softcap the scores are kept in units of c * log2(e): s' = tanh(.) + ALiBi / (c
// log2 e), and the softmax multiplies by units() inside the exp2 it already computes
// (exp2(units * s' - m)), which saves a multiply per score.
template <bool kOptions, bool kAccurateTanh = false>
struct ScoreMod {
  float scale_log2;   // scale * log2(e)
  float softcap_in;   // kOptions: scale / c, or 0 when there is no softcap
  float softcap_out;  // c * log2(e)
  float alibi;        // kOptions: -slope * log2(e) / units() of this block's head, or 0
  int offset;         // seqlen_k - seqlen_q, the ALiBi alignment

  static CUFLASH_DEVICE ScoreMod make(float scale_log2, float softcap_in, float softcap_out,
                                      float slope, int offset) {
    const float per_unit = softcap_in != 0.f ? kLog2e * rcp_approx(softcap_out) : kLog2e;
    return ScoreMod{scale_log2, softcap_in, softcap_out, -slope * per_unit, offset};
  }

  CUFLASH_DEVICE bool has_softcap() const { return kOptions && softcap_in != 0.f; }
  CUFLASH_DEVICE bool has_alibi() const { return kOptions && alibi != 0.f; }
  // What the scores below are in, relative to log2 units.
  CUFLASH_DEVICE float units() const { return has_softcap() ? softcap_out : 1.f; }

  // One score; `dist` is i + offset - j as a float (exact below 2^24), t gets the
  // softcap's tanh (unused without one).
  CUFLASH_DEVICE float score(float x, float dist, float& t) const {
    const float s = capped(x, t);
    return has_alibi() ? fmaf(alibi, fabsf(dist), s) : s;
  }
  CUFLASH_DEVICE float score(float x, int row, int col, float& t) const {
    return score(x, float(row + offset - col), t);
  }

  // The scaled (or capped) score, without the ALiBi bias.
  CUFLASH_DEVICE float capped(float x, float& t) const {
    if (!has_softcap()) return x * scale_log2;
    t = tanh_softcap<kAccurateTanh>(x * softcap_in);
    return t;
  }

  // s: one warp's dot products in mma C layout (kMRep slabs of 16 rows x kNTiles n8
  // tiles); row0: first row of slab 0, col0: first key of the tile.
  template <int kMRep, int kNTiles>
  CUFLASH_DEVICE void apply(float (&s)[kMRep][kNTiles][4], int row0, int col0, int lane) const {
    if (!has_softcap() && !has_alibi()) {
#pragma unroll
      for (int r = 0; r < kMRep; ++r)
#pragma unroll
        for (int n = 0; n < kNTiles; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[r][n][e] *= scale_log2;
      return;
    }
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float t;
          s[r][n][e] = capped(s[r][n][e], t);
        }
    if (has_alibi()) add_alibi(s, row0, col0, lane, alibi);
  }

  // s += slope_units |i + offset - j| on scores in mma C layout (as apply()).
  template <int kMRep, int kNTiles>
  CUFLASH_DEVICE void add_alibi(float (&s)[kMRep][kNTiles][4], int row0, int col0, int lane,
                                float slope_units) const {
    // i + offset - j of each element: a per-thread float plus a compile-time step
    const float dist0 = float(row0 + (lane >> 2) + offset - col0 - (lane & 3) * 2);
#pragma unroll
    for (int r = 0; r < kMRep; ++r)
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float dist = dist0 + float(r * 16 + (e >> 1) * 8 - n * 8 - (e & 1));
          s[r][n][e] = fmaf(slope_units, fabsf(dist), s[r][n][e]);
        }
  }

  // apply() with the run-time choice of transform taken once, outside the loops, so that
  // each variant is straight-line code (the sm_90a kernels, whose softmax step runs beside
  // asynchronous products, pay for every branch in it). Without a softcap the scores stay
  // in the raw products' units (scale * log2(e): the caller's exp2 scales them), ALiBi's
  // bias divided by the scale; units_or() gives the result's units.
  template <int kMRep, int kNTiles>
  CUFLASH_DEVICE void apply_unswitched(float (&s)[kMRep][kNTiles][4], int row0, int col0,
                                       int lane) const {
    if (has_softcap()) {
      if (has_alibi()) {
        apply_as<true, true>(s, row0, col0, lane, alibi);
      } else {
        apply_as<true, false>(s, row0, col0, lane, 0.f);
      }
    } else if (has_alibi()) {
      apply_as<false, true>(s, row0, col0, lane, alibi / scale_log2);
    }
  }
  // The units of apply_unswitched's result, relative to log2 units, given those of the raw
  // products.
  CUFLASH_DEVICE float units_or(float raw_units) const {
    return has_softcap() ? units() : raw_units;
  }

  // kSoftcap: c tanh(.) in units of c log2(e); else the raw products. kAlibi: plus
  // `slope_units` |i + offset - j| (the bias in the result's units).
  template <bool kSoftcap, bool kAlibi, int kMRep, int kNTiles>
  CUFLASH_DEVICE void apply_as(float (&s)[kMRep][kNTiles][4], int row0, int col0, int lane,
                               float slope_units) const {
    if (kSoftcap) {
#pragma unroll
      for (int r = 0; r < kMRep; ++r)
#pragma unroll
        for (int n = 0; n < kNTiles; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[r][n][e] = tanh_softcap<kAccurateTanh>(s[r][n][e] * softcap_in);
          }
    }
    if (kAlibi) add_alibi(s, row0, col0, lane, slope_units);
  }

  // The same on transposed scores (rows are keys, columns are queries), as the backward
  // pass holds them; dtanh gets 1 - tanh^2 as pairs in the layout of pack_frags
  // (filled only with a softcap). Returns the units of the result, relative to log2
  // units: with neither softcap nor ALiBi the dot products are left as they are and the
  // caller's exp2 multiplies by scale * log2(e) (which may be <= 0: the backward pass has
  // no running max).
  template <int kNRep, int kMTiles, bool kWide>
  CUFLASH_DEVICE float apply_transposed(float (&st)[kNRep][kMTiles][4],
                                        FloatPair<kWide> (&dtanh)[kNRep][kMTiles / 2][4], int key0,
                                        int query0, int lane) const {
    if (!has_softcap() && !has_alibi()) return scale_log2;
    const float dist0 = float(query0 + (lane & 3) * 2 + offset - key0 - (lane >> 2));
#pragma unroll
    for (int r = 0; r < kNRep; ++r)
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float t[2] = {0.f, 0.f};
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float dist = dist0 + float(m * 8 + e - r * 16 - h * 8);
            st[r][m][2 * h + e] = score(st[r][m][2 * h + e], dist, t[e]);
          }
          if (has_softcap()) {
            dtanh[r][m >> 1][2 * (m & 1) + h].set(fmaf(-t[0], t[0], 1.f),
                                                  fmaf(-t[1], t[1], 1.f));
          }
        }
    return units();
  }
};

}  // namespace cuflash
