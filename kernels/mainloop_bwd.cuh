// cuflash: the backward main loop (FlashAttention-2, Dao 2023, Algorithm 2).
//
// One thread block owns kBlockN keys of one (batch, key/value head): K_j and V_j stay in
// shared memory, dK_j and dV_j in registers, while the block walks every query tile that
// sees one of its keys (for GQA, of every query head of the group, in a fixed order).
// Each warp owns kNRep slabs of 16 keys and holds the scores transposed (keys as rows),
// so that P^T and dS^T are already the A operands of dV and dK:
//   S^T  = K Q^T                    recompute          gemm_rows_rows
//                                   (kOptions: softcap, ALiBi; scores.cuh)
//   P^T  = exp2(S^T - lse)          from the saved log-sum-exp, no online softmax
//                                   (kDropout: dropped entries are marked by sign)
//   dV  += P^T dO                                      gemm_regs_trans
//                                   (with dropout: (P o Z)^T dO, / (1 - p) at the end)
//   dP^T = V dO^T                                      gemm_rows_rows
//   dS^T = P^T (dP^T - delta)       delta = rowsum(dO o O), from the preprocess
//                                   (times 1 - tanh^2 with a softcap; with dropout
//                                   P^T (Z dP^T / (1 - p) - delta))
//   dK  += dS^T Q                   (times scale at the end)
//   dQ  += dS K                     kAtomicDQ: dS^T through shared memory, then float
//                                   atomics into a float32 buffer; otherwise a separate
//                                   pass (mainloop_bwd_dq.cuh) computes dQ with no atomics.
// With kDSplit == 2 two warps share each key slab, each holding half of the dK/dV
// columns. Above d = 128 both compute the slab's P^T and dS^T; with kSwap (d = 128) each
// computes them for half of the queries, and the halves meet in shared memory
// (step_swap), which halves the Q/dO fragments read per mma in the dV and dK products.
#pragma once
#include "common.cuh"
#include "dropout.cuh"
#include "mask.cuh"
#include "scores.cuh"
#include "seqlens.cuh"
#include "tile_load.cuh"
#include "warp_gemm.cuh"

namespace cuflash {

// The most warps, at most kMax, whose kD / n column blocks are multiples of 16.
template <int kD, int kMax>
struct DqWarpsN {
  static constexpr int value = kD % (16 * kMax) == 0 ? kMax : DqWarpsN<kD, kMax - 1>::value;
};
template <int kD>
struct DqWarpsN<kD, 1> {
  static constexpr int value = 1;
};

template <class Elem, int kHeadDim_, int kHeadDimV_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kDSplit_, int kStages_, bool kAtomicDQ_, bool kSwap_ = false>
struct BwdTraits {
  static constexpr bool kIsBf16 = Elem::kIsBf16;
  static constexpr int kPrec = Elem::kPrec;
  static constexpr int kWords = Elem::kWords;  // 16-bit units per element
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kBlockM = kBlockM_;  // queries per step
  static constexpr int kBlockN = kBlockN_;  // keys per block
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kDSplit = kDSplit_;
  static constexpr int kStages = kStages_;  // query-tile buffers (2: prefetch the next one)
  static constexpr bool kAtomicDQ = kAtomicDQ_;
  // kSwap (with kDSplit == 2): the two warps of a key slab split the queries of S^T and
  // dP^T instead of both computing all of them, and swap their halves of P^T and dS^T
  // through shared memory (a P^T tile, and the dS^T tile).
  static constexpr bool kSwap = kSwap_;
  // dS^T buffers: step i writes one while step i+1 reads the other for dQ, so the barrier
  // at the top of each step is the only one for dQ (none without atomic dQ, unless the
  // swap needs one).
  static constexpr int kDSBuffers = kAtomicDQ ? 2 : (kSwap ? 1 : 0);
  static constexpr int kPBuffers = kSwap ? 1 : 0;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kKeyWarps = kNWarps / kDSplit;
  static constexpr int kNRep = kBlockN / (16 * kKeyWarps);  // 16-key slabs per warp
  static constexpr int kMTiles = kBlockM / 8;               // n8 tiles of S^T (queries)
  static constexpr int kDKCols = kHeadDim / kDSplit;        // dK columns of one warp
  static constexpr int kDVCols = kHeadDimV / kDSplit;
  // dQ = dS K: warps tile kBlockM x kHeadDim as kDQWarpsM x kDQWarpsN, 32 rows a warp
  // where possible (square warp tiles read the fewest operand bytes); column blocks must
  // be multiples of 16, and warps beyond kDQWarpsM * kDQWarpsN sit this product out.
  static constexpr int kDQWarpsM = kBlockM / 32 < kNWarps ? kBlockM / 32 : kNWarps;
  static constexpr int kDQWarpsN = DqWarpsN<kHeadDim, kNWarps / kDQWarpsM>::value;
  static constexpr int kDQMRep = kBlockM / 16 / kDQWarpsM;
  static constexpr int kDQCols = kHeadDim / kDQWarpsN;
  static constexpr int kDQChunk = kDQCols % 32 == 0 ? 32 : 16;  // columns per partial sum
  static constexpr int kDQPieces = kDQMRep * (kDQCols / kDQChunk);
  static constexpr int kAccRegs = kNRep * (2 * kMTiles + (kDKCols + kDVCols) / 8) * 4;
  static constexpr bool kUnrollCopies = kAccRegs <= 128;

  static_assert(kNWarps % kDSplit == 0 && kBlockN % (16 * kKeyWarps) == 0, "key slabs");
  static_assert(kDKCols % 16 == 0 && kDVCols % 16 == 0, "dK/dV column split");
  static_assert(kBlockM % 32 == 0 && kNWarps % kDQWarpsM == 0 && kDQCols % 16 == 0, "dQ split");
  static_assert(kBlockM % (16 * kDQWarpsM) == 0, "dQ row split");
  static_assert(kStages == 1 || kStages == 2, "one or two query-tile buffers");
  static_assert(!kSwap || (kDSplit == 2 && kBlockM % 64 == 0), "swap: pairs of warps, 32+ queries each");
  static_assert(!kSwap || kPrec != kPrecTF32, "float32: no swap tiles");

  // tiles in 16-bit units (a float32 row is twice as wide)
  using TileQ = SmemTile<kBlockM, kHeadDim * kWords>;
  using TileDO = SmemTile<kBlockM, kHeadDimV * kWords>;
  using TileK = SmemTile<kBlockN, kHeadDim * kWords>;
  using TileV = SmemTile<kBlockN, kHeadDimV * kWords>;
  using TileDS = SmemTile<kBlockN, kBlockM * kWords>;  // dS^T: keys x queries

  static constexpr int kStageBytes = TileQ::kBytes + TileDO::kBytes + 2 * kBlockM * 4;
  static constexpr int kSmemBytes =
      TileK::kBytes + TileV::kBytes + (kDSBuffers + kPBuffers) * TileDS::kBytes +
      kStages * kStageBytes;
};

template <class T, bool kCausal, bool kVec, bool kOptions, bool kDropout>
struct BwdMainloop {
  static constexpr bool kAtomicDQ = T::kAtomicDQ;
  // float32 inputs: an accurate softcap tanh, and its derivative kept in float32
  // (CUFLASH_WIDE_DTANH: the derivative in float32 for 16-bit inputs too; tools/diag_softcap.py)
  using Scores = ScoreMod<kOptions, T::kPrec == kPrecTF32>;
#ifdef CUFLASH_WIDE_DTANH
  using Dtanh = FloatPair<true>;
#else
  using Dtanh = FloatPair<T::kPrec == kPrecTF32>;
#endif
  // Query-side operands, as the kernel received them: offsets are computed where they are
  // used (from `batch` and the head), which leaves ptxas free to reload these from the
  // parameter space instead of holding derived pointers in registers all the loop long.
  const u16* q;
  const u16* dout;
  i64 q_batch_stride, q_head_stride, q_row_stride;
  i64 do_batch_stride, do_head_stride, do_row_stride;
  // Row statistics, seqlen_q_pad rows per head (seqlens.cuh, SeqLens::stats_start):
  const float* lse_log2;  // lse * log2(e), +inf where no key
  const float* delta;
  float* dq_accum;        // x kHeadDim, float32
  int batch, num_heads_q;
  const int* cu_seqlens_q;  // packed sequences (else null); see q_start(), stats_row0()
  int seqlen_q, seqlen_q_pad, head_dim, head_dim_v;
  int head0, m_block_min, m_block_end;  // query heads head0.., tiles m_block_min..m_block_end-1
  int n_block;
  float scale_log2;
  float softcap_in, softcap_out;  // kOptions (scores.cuh)
  const float* alibi_slopes;      // kOptions: (batch, num_heads_q) with this batch stride, or null
  i64 alibi_batch_stride;
  Dropout<kDropout> dropout;      // of query head 0 of this batch element (bh + head)
  float dropout_scale;            // 1 / (1 - p)
  Mask<kCausal, kOptions> mask;
  u32 smem;
  int tid, key_row0, d_part;
  LanePatterns lp;

  // Packed sequences: this one's first row of q and dout, and of the row statistics
  // (seqlens.cuh), reloaded where used rather than held across the loop.
  CUFLASH_DEVICE int q_start() const { return cu_seqlens_q ? cu_seqlens_q[batch] : 0; }
  CUFLASH_DEVICE i64 stats_row0() const {
    const SeqLens seq{0, 0, q_start(), 0, cu_seqlens_q != nullptr};
    return seq.stats_start(batch, num_heads_q, seqlen_q_pad);
  }

  CUFLASH_DEVICE u32 sK() const { return smem; }
  CUFLASH_DEVICE u32 sV() const { return smem + T::TileK::kBytes; }
  CUFLASH_DEVICE u32 sDS(int buf) const { return sV() + T::TileV::kBytes + buf * T::TileDS::kBytes; }
  CUFLASH_DEVICE u32 sP() const { return sDS(T::kDSBuffers); }  // kSwap: P^T, keys x queries
  CUFLASH_DEVICE u32 sQ(int st) const {
    return sV() + T::TileV::kBytes + (T::kDSBuffers + T::kPBuffers) * T::TileDS::kBytes +
           st * T::kStageBytes;
  }
  CUFLASH_DEVICE u32 sDO(int st) const { return sQ(st) + T::TileQ::kBytes; }
  CUFLASH_DEVICE u32 sLse(int st) const { return sDO(st) + T::TileDO::kBytes; }
  CUFLASH_DEVICE u32 sDelta(int st) const { return sLse(st) + T::kBlockM * 4; }

  // The steps visit query heads head0, head0 + 1, ... and, for each, the query tiles
  // m_block_min .. m_block_end - 1; a cursor walks them without divisions.
  struct Cursor {
    int head, m_block;
  };
  CUFLASH_DEVICE Cursor first() const { return Cursor{head0, m_block_min}; }
  CUFLASH_DEVICE void advance(Cursor& c) const {
    // (the bounds are recomputed from the parameters and the block index rather than
    // kept live across the loop)
    const int n0 = block_index<kCausal ? 2 : 0>() * T::kBlockN;
    if (++c.m_block == mask.template m_block_end<T::kBlockM, T::kBlockN>(n0)) {
      c.m_block = mask.template m_block_min<T::kBlockM>(n0);
      ++c.head;
    }
  }

  // The score transform of query head `head` (kOptions: its ALiBi slope).
  CUFLASH_DEVICE Scores scores(int head) const {
    const float slope =
        kOptions && alibi_slopes ? alibi_slopes[batch * alibi_batch_stride + head] : 0.f;
    return Scores::make(scale_log2, softcap_in, softcap_out, slope, mask.offset());
  }

  // P^T = exp2(S^T - lse) from the raw products of a (kMTiles x 8)-query slice starting at
  // query q0 of the tile; kOptions also gives the softcap's 1 - tanh^2 (dtanh). Hidden
  // entries are zeroed after the exp2 (not set to -inf before it, which a scale <= 0
  // would turn into +inf or NaN).
  template <bool kMasked, int kMTiles>
  CUFLASH_DEVICE void probabilities(float (&s)[T::kNRep][kMTiles][4],
                                    Dtanh (&dtanh)[T::kNRep][kMTiles / 2][4], int head, int m0,
                                    int q0, int st) const {
    const int lane = tid & 31;
    const int key0 = n_block * T::kBlockN + key_row0;
    float units = scale_log2;
    if constexpr (kOptions) units = scores(head).apply_transposed(s, dtanh, key0, m0 + q0, lane);
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      float lse[2];
      ld_shared_f2(lse[0], lse[1], sLse(st) + (q0 + m * 8 + (lane & 3) * 2) * 4);
#pragma unroll
      for (int r = 0; r < T::kNRep; ++r)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[r][m][e] = exp2_approx(fmaf(s[r][m][e], units, -lse[e & 1]));
    }
    if (kMasked) mask.apply_transposed(s, key0, m0 + q0, lane, 0.f);
    if constexpr (kDropout) {
      if (dropout.active()) {
        dropout.for_head(head).template apply_transposed<true>(s, key0, m0 + q0, lane);
      }
    }
  }

  // P^T at fragment (r, m), row half h, columns e = 0, 1, from `pf`: fp16 pairs (pack_frags
  // to fp16, [kMTiles / 2]) or, for float32 inputs, tf32 A fragments ([kMTiles], float32
  // bits, whose registers hold (h, e) = (0, 0), (1, 0), (0, 1), (1, 1)).
  template <int kMTiles, int kN>
  static CUFLASH_DEVICE void p_pair(const u32 (&pf)[T::kNRep][kN][4], int r, int m, int h,
                                    float (&p)[2]) {
    if constexpr (kN == kMTiles) {
      p[0] = __uint_as_float(pf[r][m][h]);
      p[1] = __uint_as_float(pf[r][m][h + 2]);
    } else {
      unpack2<false>(pf[r][m >> 1][2 * (m & 1) + h], p[0], p[1]);
    }
  }

  // dS^T = P^T (dP^T - delta) (times 1 - tanh^2 with a softcap), in place of dP^T; `pf`
  // holds P^T (p_pair): fp16 pairs, which keep dS's error at a plain 16-bit
  // implementation's level, or for float32 inputs P itself (as a plain float32
  // implementation has it; fp16 would round it, and lose the small ones to its range).
  // With dropout, P^T < 0 marks a dropped entry, whose dP^T counts as 0; kept ones take
  // dP^T / (1 - p).
  template <int kMTiles, int kN>
  CUFLASH_DEVICE void scores_grad(float (&dp)[T::kNRep][kMTiles][4],
                                  const u32 (&pf)[T::kNRep][kN][4],
                                  const Dtanh (&dtanh)[T::kNRep][kMTiles / 2][4], int q0,
                                  int st) const {
    if constexpr (kDropout) {
      if (dropout.active()) {
        scores_grad_with(dp, pf, dtanh, q0, st, BoolConst<true>{});
        return;
      }
    }
    scores_grad_with(dp, pf, dtanh, q0, st, BoolConst<false>{});
  }

  template <int kMTiles, int kN, bool kDropped>
  CUFLASH_DEVICE void scores_grad_with(float (&dp)[T::kNRep][kMTiles][4],
                                       const u32 (&pf)[T::kNRep][kN][4],
                                       const Dtanh (&dtanh)[T::kNRep][kMTiles / 2][4], int q0,
                                       int st, BoolConst<kDropped>) const {
    const int lane = tid & 31;
    const bool softcap = kOptions && softcap_in != 0.f;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      float delta[2];
      ld_shared_f2(delta[0], delta[1], sDelta(st) + (q0 + m * 8 + (lane & 3) * 2) * 4);
#pragma unroll
      for (int r = 0; r < T::kNRep; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float p[2], d[2] = {1.f, 1.f};
          p_pair<kMTiles>(pf, r, m, h, p);
          if (softcap) dtanh[r][m >> 1][2 * (m & 1) + h].get(d[0], d[1]);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = dp[r][m][2 * h + e];
            if (kDropped) {
              const float dpz = p[e] >= 0.f ? x * dropout_scale : 0.f;
              x = fabsf(p[e]) * d[e] * (dpz - delta[e]);
            } else {
              x = (softcap ? p[e] * d[e] : p[e]) * (x - delta[e]);
            }
          }
        }
    }
  }

  // Q_i, dO_i, lse_i and delta_i of step `it` into query buffer `st`.
  CUFLASH_DEVICE void load_query_tile(const Cursor& c, int st) const {
    const int head = c.head, m0 = c.m_block * T::kBlockM;
    const int tid = thread_index();  // see thread_index(): keeps the copy offsets short-lived
    const int rows = seqlen_q - m0;
    load_tile<T::kBlockM, T::kHeadDim * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sQ(st), q + batch * q_batch_stride + head * q_head_stride + (q_start() + m0) * q_row_stride,
        q_row_stride, rows,
        head_dim, tid);
    load_tile<T::kBlockM, T::kHeadDimV * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sDO(st),
        dout + batch * do_batch_stride + head * do_head_stride + (q_start() + m0) * do_row_stride,
        do_row_stride, rows,
        head_dim_v, tid);
    // The row statistics are padded to seqlen_q_pad rows: whole 16-byte chunks.
    constexpr int kChunks = T::kBlockM / 4;
    const i64 row0 = stats_row0() + i64(head) * seqlen_q_pad + m0;
    if (tid < kChunks) {
      cp_async_16(sLse(st) + tid * 16, lse_log2 + row0 + tid * 4, true);
    } else if (tid < 2 * kChunks) {
      cp_async_16(sDelta(st) + (tid - kChunks) * 16, delta + row0 + (tid - kChunks) * 4, true);
    }
  }

  // Issues K_j, V_j and the first query tile as one copy group.
  CUFLASH_DEVICE void prologue(const u16* k_tile, i64 k_row_stride, const u16* v_tile,
                               i64 v_row_stride, int rows_k, int n_iters) const {
    load_tile<T::kBlockN, T::kHeadDim * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sK(), k_tile, k_row_stride, rows_k, head_dim, tid);
    load_tile<T::kBlockN, T::kHeadDimV * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sV(), v_tile, v_row_stride, rows_k, head_dim_v, tid);
    if (n_iters > 0) load_query_tile(first(), 0);
    cp_async_commit();
  }

#ifndef CUFLASH_DQ_AT
#define CUFLASH_DQ_AT 2  // where a step computes the previous step's dQ (probes move it)
#endif
#ifndef CUFLASH_DQ_AT2
#define CUFLASH_DQ_AT2 CUFLASH_DQ_AT
#endif

  // One query tile. `prev` is the previous step's tile, whose dQ this step computes from
  // the other dS^T buffer (when has_prev).
  template <bool kMasked>
  CUFLASH_DEVICE void step(int head, int m0, int st, int ds_buf, const Cursor& prev, bool has_prev,
                           float (&dk_acc)[T::kNRep][T::kDKCols / 8][4],
                           float (&dv_acc)[T::kNRep][T::kDVCols / 8][4]) const {
    constexpr int kPrec = T::kPrec;
    pending_dq(0, prev, has_prev, ds_buf);

    // S^T = K Q^T, then P^T = exp2(S^T * scale * log2(e) - lse * log2(e)), kept for dS as
    // fp16 pairs for 16-bit inputs: P is in [0, 1], and fp16's 11 significant bits keep
    // dS's error at a plain implementation's level where bf16's 8 would double it (float32
    // inputs use p_in, P in float32, instead: see scores_grad).
    u32 p[T::kNRep][T::kBlockM / 16][4];
    // P^T as dV's operand in the input precision (bf16, tf32; fp16 uses p), then (tf32)
    // dS^T, which fp16 and bf16 pack in place of p
    u32 p_in[T::kNRep][T::kBlockM / kKStep<kPrec>][4];
    Dtanh dtanh[T::kNRep][T::kBlockM / 16][4];  // kOptions with a softcap
    {
      float s[T::kNRep][T::kMTiles][4];
      gemm_rows_rows<kPrec, T::kNRep, T::kBlockM, T::kHeadDim * T::kWords, typename T::TileK,
                     typename T::TileQ>(s, sK(), lp, sQ(st));
      probabilities<kMasked>(s, dtanh, head, m0, 0, st);
      if constexpr (kPrec != kPrecTF32) pack_frags<kPrecF16, T::kNRep, T::kBlockM>(p, s);
      if constexpr (kPrec != kPrecF16) pack_frags<kPrec, T::kNRep, T::kBlockM>(p_in, s);
    }
    pending_dq(1, prev, has_prev, ds_buf);

    // dV += P^T dO (kDropout: dropped entries, negative, count as 0)
    if constexpr (kPrec == kPrecF16) {
      gemm_regs_trans<kPrec, T::kNRep, T::kDVCols, T::kBlockM, typename T::TileDO, kDropout>(
          dv_acc, p, sDO(st), lp, d_part * T::kDVCols);
    } else {
      gemm_regs_trans<kPrec, T::kNRep, T::kDVCols, T::kBlockM, typename T::TileDO, kDropout>(
          dv_acc, p_in, sDO(st), lp, d_part * T::kDVCols);
    }
    pending_dq(2, prev, has_prev, ds_buf);

    // dP^T = V dO^T, then dS^T = P^T (dP^T - delta), packed in the input precision
    float dp[T::kNRep][T::kMTiles][4];
    gemm_rows_rows<kPrec, T::kNRep, T::kBlockM, T::kHeadDimV * T::kWords, typename T::TileV,
                   typename T::TileDO>(dp, sV(), lp, sDO(st));
    if constexpr (kPrec == kPrecTF32) {
      scores_grad(dp, p_in, dtanh, 0, st);
    } else {
      scores_grad(dp, p, dtanh, 0, st);
    }
    if constexpr (kPrec == kPrecTF32) {
      dk_and_ds(p_in, dp, st, ds_buf, dk_acc, prev, has_prev);
    } else {
      dk_and_ds(p, dp, st, ds_buf, dk_acc, prev, has_prev);
    }
  }

  // The end of a step: dS^T packed into `ds` (A fragments of the input precision), then
  // dK += dS^T Q, and dS^T into shared memory for dQ.
  template <class Frags>
  CUFLASH_DEVICE void dk_and_ds(Frags& ds, const float (&dp)[T::kNRep][T::kMTiles][4], int st,
                                int ds_buf, float (&dk_acc)[T::kNRep][T::kDKCols / 8][4],
                                const Cursor& prev, bool has_prev) const {
    const int lane = tid & 31;
    pack_frags<T::kPrec, T::kNRep, T::kBlockM>(ds, dp);
    pending_dq(3, prev, has_prev, ds_buf);

    // dK += dS^T Q
    gemm_regs_trans<T::kPrec, T::kNRep, T::kDKCols, T::kBlockM, typename T::TileQ>(
        dk_acc, ds, sQ(st), lp, d_part * T::kDKCols);

    // dS^T for dQ, which the next step (or the end of the loop) computes.
    if (kAtomicDQ && d_part == 0) {
      store_packed<T::kPrec, typename T::TileDS, T::kNRep, T::kBlockM>(sDS(ds_buf), ds,
                                                                      key_row0, lane);
    }
  }

  // The previous step's dQ (from the other dS^T buffer), in one or two parts placed among
  // this step's products: at CUFLASH_DQ_AT and CUFLASH_DQ_AT2 (probes move them).
  CUFLASH_DEVICE void pending_dq(int at, const Cursor& prev, bool has_prev, int ds_buf) const {
    if (!kAtomicDQ || !has_prev) return;
    constexpr int kHalf = CUFLASH_DQ_AT == CUFLASH_DQ_AT2 ? T::kDQPieces : (T::kDQPieces + 1) / 2;
    const int m0_prev = prev.m_block * T::kBlockM;
    if (at == CUFLASH_DQ_AT) accumulate_dq(prev.head, m0_prev, ds_buf ^ 1, 0, kHalf);
    if (at == CUFLASH_DQ_AT2 && kHalf < T::kDQPieces) {
      accumulate_dq(prev.head, m0_prev, ds_buf ^ 1, kHalf, T::kDQPieces);
    }
  }

  // kSwap: one query tile. This warp computes S^T and dP^T for its slab's keys and its
  // half of the queries, stores its halves of P^T and dS^T, and after a barrier runs the
  // dV and dK products on the whole tiles, for its half of the columns.
  template <bool kMasked>
  CUFLASH_DEVICE void step_swap(int head, int m0, int st, int ds_buf, const Cursor& prev,
                                bool has_prev,
                                float (&dk_acc)[T::kNRep][T::kDKCols / 8][4],
                                float (&dv_acc)[T::kNRep][T::kDVCols / 8][4]) const {
    constexpr int kPrec = T::kPrec;  // (16-bit only: kSwap)
    constexpr int kHalfM = T::kBlockM / 2;
    const int lane = tid & 31;
    const int q0 = d_part * kHalfM;  // this warp's first query of the tile
    pending_dq(0, prev, has_prev, ds_buf);
    u32 p16[T::kNRep][kHalfM / 16][4];  // P^T in fp16, for dS (see step)
    Dtanh dtanh[T::kNRep][kHalfM / 16][4];  // kOptions with a softcap
    {
      float s[T::kNRep][kHalfM / 8][4];
      gemm_rows_rows<kPrec, T::kNRep, kHalfM, T::kHeadDim, typename T::TileK,
                     typename T::TileQ>(s, sK(), lp, sQ(st), q0);
      probabilities<kMasked>(s, dtanh, head, m0, q0, st);
      pack_frags<false, T::kNRep, kHalfM>(p16, s);
      u32 p_in[T::kNRep][kHalfM / 16][4];
      pack_frags<kPrec, T::kNRep, kHalfM>(p_in, s);
      if (kDropout && dropout.active()) {  // dV's operand: dropped entries count as 0
#pragma unroll
        for (int r = 0; r < T::kNRep; ++r)
#pragma unroll
          for (int kk = 0; kk < kHalfM / 16; ++kk)
#pragma unroll
            for (int j = 0; j < 4; ++j) p_in[r][kk][j] = relu_frag<kPrec>(p_in[r][kk][j]);
      }
      store_packed<kPrec, typename T::TileDS, T::kNRep, kHalfM>(sP(), p_in, key_row0, lane, q0);
    }
    pending_dq(1, prev, has_prev, ds_buf);
    {
      float dp[T::kNRep][kHalfM / 8][4];
      gemm_rows_rows<kPrec, T::kNRep, kHalfM, T::kHeadDimV, typename T::TileV,
                     typename T::TileDO>(dp, sV(), lp, sDO(st), q0);
      scores_grad(dp, p16, dtanh, q0, st);
      pack_frags<kPrec, T::kNRep, kHalfM>(p16, dp);
      store_packed<kPrec, typename T::TileDS, T::kNRep, kHalfM>(sDS(ds_buf), p16, key_row0, lane,
                                                                q0);
    }
    __syncthreads();  // both halves of P^T and dS^T in place
    pending_dq(2, prev, has_prev, ds_buf);
    // dV += P^T dO and dK += dS^T Q over the whole tile, this warp's columns
    gemm_rows_trans<kPrec, T::kNRep, T::kDVCols, T::kBlockM, typename T::TileDS,
                    typename T::TileDO>(dv_acc, sP(), sDO(st), lp, d_part * T::kDVCols);
    pending_dq(3, prev, has_prev, ds_buf);
    gemm_rows_trans<kPrec, T::kNRep, T::kDKCols, T::kBlockM, typename T::TileDS,
                    typename T::TileQ>(dk_acc, sDS(ds_buf), sQ(st), lp, d_part * T::kDKCols);
  }

  // dQ_i += dS K_j (unscaled; the conversion pass multiplies by scale), by float atomics,
  // in column chunks of kDQChunk to keep the partial sums few.
  // Pieces [lo, hi) of this warp's dQ tile (piece = one 16-row slab x kDQChunk columns).
  // dq_accum holds each kBlockM-row tile in fragment order (DqAccumLayout), so that one
  // 16-byte atomic per lane covers a fragment and a warp's atomics are contiguous.
  CUFLASH_DEVICE void accumulate_dq(int head, int m0, int ds_buf, int lo = 0,
                                    int hi = T::kDQPieces) const {
#ifdef CUFLASH_PROBE_NO_DQ  // tools/probe_bwd.py: time the kernel without this product
    return;
#endif
    const int warp = tid >> 5, lane = tid & 31;
    if (T::kDQWarpsM * T::kDQWarpsN < T::kNWarps && warp >= T::kDQWarpsM * T::kDQWarpsN) return;
    const int row0 = (warp % T::kDQWarpsM) * T::kDQMRep * 16;
    const int col0 = (warp / T::kDQWarpsM) * T::kDQCols;
    float* dst = dq_accum + (stats_row0() + i64(head) * seqlen_q_pad + m0) * T::kHeadDim +
                 warp * (T::kDQMRep * T::kDQCols * 16) + lane * 4;
    if (lo == 0 && hi == T::kDQPieces && T::kDQChunk == T::kDQCols) {
      // all slabs in one product: the K fragments are loaded once for all of them
      float dq[T::kDQMRep][T::kDQCols / 8][4];
      gemm_trans_trans<T::kPrec, T::kDQMRep, T::kDQCols, T::kBlockN, typename T::TileDS,
                       typename T::TileK>(dq, sDS(ds_buf), row0, sK(), col0, lp);
#pragma unroll
      for (int r = 0; r < T::kDQMRep; ++r)
#pragma unroll
        for (int n = 0; n < T::kDQCols / 8; ++n) {
#ifdef CUFLASH_PROBE_NO_RED
          if (dq[r][n][0] == 1234.5f) dst[0] = dq[r][n][1] + dq[r][n][2] + dq[r][n][3];
#else
          red_add_f32x4(dst + (r * (T::kDQCols / 8) + n) * 128, dq[r][n]);
#endif
        }
      return;
    }
#pragma unroll
    for (int piece = 0; piece < T::kDQPieces; ++piece) {
      if (piece < lo || piece >= hi) continue;
      const int r = piece % T::kDQMRep, c = piece / T::kDQMRep * T::kDQChunk;
      float dq[1][T::kDQChunk / 8][4];
      gemm_trans_trans<T::kPrec, 1, T::kDQChunk, T::kBlockN, typename T::TileDS,
                       typename T::TileK>(dq, sDS(ds_buf), row0 + r * 16, sK(), col0 + c, lp);
#pragma unroll
      for (int n = 0; n < T::kDQChunk / 8; ++n) {
        float* frag = dst + (r * (T::kDQCols / 8) + c / 8 + n) * 128;
#ifdef CUFLASH_PROBE_NO_RED  // tools/probe_bwd.py: the product without its atomics
        if (dq[0][n][0] == 1234.5f) frag[0] = dq[0][n][1] + dq[0][n][2] + dq[0][n][3];
#else
        red_add_f32x4(frag, dq[0][n]);
#endif
      }
    }
  }

  CUFLASH_DEVICE void run(int n_iters, float (&dk_acc)[T::kNRep][T::kDKCols / 8][4],
                          float (&dv_acc)[T::kNRep][T::kDVCols / 8][4]) const {
    int st = 0;
    Cursor cur = first(), next = cur, prev = cur;
    advance(next);
    for (int it = 0; it < n_iters; ++it) {
      if (T::kStages == 2) {
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < n_iters) load_query_tile(next, st ^ 1);
        cp_async_commit();
      } else {
        if (it > 0) {
          __syncthreads();
          load_query_tile(cur, 0);
          cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();
      }
      const int m0 = cur.m_block * T::kBlockM;
      // Masks: the causal diagonal and a ragged last key tile; padded query rows need
      // none (their lse is +inf, so P = 0).
      const int ds_buf = kAtomicDQ ? it & 1 : 0;
      const bool masked = mask.template tile_needs_mask<T::kBlockN, T::kBlockM>(n_block, m0);
      if constexpr (T::kSwap) {
        if (masked) {
          step_swap<true>(cur.head, m0, st, ds_buf, prev, it > 0, dk_acc, dv_acc);
        } else {
          step_swap<false>(cur.head, m0, st, ds_buf, prev, it > 0, dk_acc, dv_acc);
        }
      } else {
        if (masked) {
          step<true>(cur.head, m0, st, ds_buf, prev, it > 0, dk_acc, dv_acc);
        } else {
          step<false>(cur.head, m0, st, ds_buf, prev, it > 0, dk_acc, dv_acc);
        }
      }
      st = T::kStages == 2 ? st ^ 1 : 0;
      prev = cur;
      cur = next;
      advance(next);
    }
    if (kAtomicDQ && n_iters > 0) {
      __syncthreads();
      accumulate_dq(prev.head, prev.m_block * T::kBlockM, (n_iters - 1) & 1);
    }
    cp_async_wait<0>();
  }
};

}  // namespace cuflash
