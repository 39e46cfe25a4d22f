// cuflash: dQ without atomics, for deterministic=True.
//
// One thread block owns kBlockM query rows of one (batch, head) and walks the key tiles
// in a fixed order, like the forward pass, so every dQ element is summed in the same
// order on every run. It recomputes what the main backward kernel already had:
//   S  = Q K^T, P = exp2(S - lse)                   gemm_rows_rows (kOptions: scores.cuh)
//   dP = dO V^T, dS = P (dP - delta)                gemm_rows_rows
//   (kDropout: dS = P (Z dP / (1 - p) - delta), Z from dropout.cuh)
//   dQ += dS K                                      gemm_regs_trans (dS from registers)
// which costs three extra matrix products per tile pair (docs/perf-log.md gives the price).
#pragma once
#include "common.cuh"
#include "dropout.cuh"
#include "mask.cuh"
#include "scores.cuh"
#include "tile_load.cuh"
#include "warp_gemm.cuh"

namespace cuflash {

template <class Elem, int kHeadDim_, int kHeadDimV_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kStages_>
struct BwdDqTraits {
  static constexpr bool kIsBf16 = Elem::kIsBf16;
  static constexpr int kPrec = Elem::kPrec;
  static constexpr int kWords = Elem::kWords;  // 16-bit units per element
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kStages = kStages_;  // K/V buffers (2: prefetch the next tile)
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMRep = kBlockM / (16 * kNWarps);
  static constexpr int kNTiles = kBlockN / 8;
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kAccRegs = kMRep * (2 * kNTiles + kDTiles) * 4;
  static constexpr bool kUnrollCopies = kAccRegs <= 128;

  static_assert(kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0, "tile shape");
  static_assert(kStages == 1 || kStages == 2, "one or two K/V buffers");

  // tiles in 16-bit units (a float32 row is twice as wide)
  using TileQ = SmemTile<kBlockM, kHeadDim * kWords>;  // also stages dQ in the epilogue
  using TileDO = SmemTile<kBlockM, kHeadDimV * kWords>;
  using TileK = SmemTile<kBlockN, kHeadDim * kWords>;
  using TileV = SmemTile<kBlockN, kHeadDimV * kWords>;

  static constexpr int kStageBytes = TileK::kBytes + TileV::kBytes;
  static constexpr int kSmemBytes = TileQ::kBytes + TileDO::kBytes + kStages * kStageBytes;
};

template <class T, bool kCausal, bool kVec, bool kOptions, bool kDropout>
struct BwdDqMainloop {
  const u16* k_head;
  const u16* v_head;
  i64 k_row_stride, v_row_stride;
  int seqlen_k, head_dim, head_dim_v;
  float scale_log2;
  int n_block_min;
  ScoreMod<kOptions, T::kPrec == kPrecTF32> scores;
  Mask<kCausal, kOptions> mask;
  Dropout<kDropout> dropout;
  float dropout_scale;  // 1 / (1 - p)
  u32 smem;  // [Q][dO][K_0 V_0][K_1 V_1]
  int m0, warp_row0, tid;
  float lse_log2[T::kMRep][2];  // this thread's rows: lse * log2(e), +inf where no key
  float delta[T::kMRep][2];
  LanePatterns lp;

  CUFLASH_DEVICE u32 sQ() const { return smem; }
  CUFLASH_DEVICE u32 sDO() const { return smem + T::TileQ::kBytes; }
  CUFLASH_DEVICE u32 sK(int st) const { return sDO() + T::TileDO::kBytes + st * T::kStageBytes; }
  CUFLASH_DEVICE u32 sV(int st) const { return sK(st) + T::TileK::kBytes; }

  CUFLASH_DEVICE void load_kv(int n, int st) const {
    const int rows = seqlen_k - n * T::kBlockN;
    load_tile<T::kBlockN, T::kHeadDim * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sK(st), k_head + i64(n) * T::kBlockN * k_row_stride, k_row_stride, rows, head_dim, tid);
    load_tile<T::kBlockN, T::kHeadDimV * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sV(st), v_head + i64(n) * T::kBlockN * v_row_stride, v_row_stride, rows, head_dim_v,
        tid);
  }

  template <bool kMasked>
  CUFLASH_DEVICE void step(int n, int st, float (&dq_acc)[T::kMRep][T::kDTiles][4]) const {
    constexpr int kPrec = T::kPrec;
    const int lane = tid & 31;
    if (T::kStages == 2) {
      cp_async_wait<0>();
      __syncthreads();
      if (n > n_block_min) load_kv(n - 1, st ^ 1);
      cp_async_commit();
    } else {
      __syncthreads();
      load_kv(n, 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
    }

    float s[T::kMRep][T::kNTiles][4];
    gemm_rows_rows<kPrec, T::kMRep, T::kBlockN, T::kHeadDim * T::kWords, typename T::TileQ,
                   typename T::TileK>(s, sQ(), lp, sK(st));
    if constexpr (kOptions) {
      // P, times 1 - tanh^2 with a softcap, right away: this pass needs no bare P.
#pragma unroll
      for (int r = 0; r < T::kMRep; ++r)
#pragma unroll
        for (int j = 0; j < T::kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + warp_row0 + r * 16 + (lane >> 2) + (e >> 1) * 8;
            const int col = n * T::kBlockN + j * 8 + (lane & 3) * 2 + (e & 1);
            float t = 0.f;
            const float x = scores.score(s[r][j][e], row, col, t);
            float p = exp2_approx(fmaf(x, scores.units(), -lse_log2[r][e >> 1]));
            if (kMasked && mask.hidden_at(row, col)) p = 0.f;
            if (scores.has_softcap()) p *= fmaf(-t, t, 1.f);
            s[r][j][e] = p;
          }
      // dropped entries: -P (P >= 0), so that dS below can tell them apart
      if constexpr (kDropout) {
        if (dropout.active()) dropout.template apply<true>(s, m0 + warp_row0, n * T::kBlockN, lane);
      }
    }
    float dp[T::kMRep][T::kNTiles][4];
    gemm_rows_rows<kPrec, T::kMRep, T::kBlockN, T::kHeadDimV * T::kWords, typename T::TileDO,
                   typename T::TileV>(dp, sDO(), lp, sV(st));
    if constexpr (kDropout) {
      if (dropout.active()) {
        scores_grad<true>(s, dp);
      } else {
        scores_grad<false>(s, dp);
      }
    } else {
      scores_grad<false>(s, dp);
    }
    // Hidden entries: dS = 0, set after the fact (a scale <= 0 makes their P +inf or NaN)
    if (!kOptions && kMasked) mask.apply(s, m0 + warp_row0, n * T::kBlockN, lane, 0.f);
    u32 ds[T::kMRep][T::kBlockN / kKStep<kPrec>][4];
    pack_frags<kPrec, T::kMRep, T::kBlockN>(ds, s);
    gemm_regs_trans<kPrec, T::kMRep, T::kHeadDim, T::kBlockN, typename T::TileK>(dq_acc, ds,
                                                                                 sK(st), lp);
  }

  // dS = P (dP - delta) in place of s, which holds P (kOptions) or the raw products; with
  // kDropped, P < 0 marks a dropped entry (its dP counts as 0) and kept ones take
  // dP / (1 - p).
  template <bool kDropped>
  CUFLASH_DEVICE void scores_grad(float (&s)[T::kMRep][T::kNTiles][4],
                                  const float (&dp)[T::kMRep][T::kNTiles][4]) const {
#pragma unroll
    for (int r = 0; r < T::kMRep; ++r)
#pragma unroll
      for (int j = 0; j < T::kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (kDropped) {
            const float p = s[r][j][e];
            const float dpz = p >= 0.f ? dp[r][j][e] * dropout_scale : 0.f;
            s[r][j][e] = fabsf(p) * (dpz - delta[r][e >> 1]);
          } else {
            const float p = kOptions
                ? s[r][j][e]
                : exp2_approx(fmaf(s[r][j][e], scale_log2, -lse_log2[r][e >> 1]));
            s[r][j][e] = p * (dp[r][j][e] - delta[r][e >> 1]);
          }
        }
  }

  // Key tiles n_block_max-1 down to n_block_min: the masked ones (ragged end, causal
  // diagonal, window edges) apart, as in the forward pass.
  CUFLASH_DEVICE void run(int n_block_max, float (&dq_acc)[T::kMRep][T::kDTiles][4]) const {
    int n = n_block_max - 1;
    int st = 0;
    for (; n >= n_block_min && needs_mask(n); --n) {
      step<true>(n, st, dq_acc);
      st = T::kStages == 2 ? st ^ 1 : 0;
    }
    for (; n >= n_block_min && !(kOptions && needs_mask(n)); --n) {
      step<false>(n, st, dq_acc);
      st = T::kStages == 2 ? st ^ 1 : 0;
    }
    if (kOptions) {
      for (; n >= n_block_min; --n) {
        step<true>(n, st, dq_acc);
        st = T::kStages == 2 ? st ^ 1 : 0;
      }
    }
    cp_async_wait<0>();
  }

  CUFLASH_DEVICE bool needs_mask(int n) const {
    return mask.template tile_needs_mask<T::kBlockN, T::kBlockM>(n, m0);
  }
};

}  // namespace cuflash
