// cuflash: the forward main loop. Each warp owns kMRep slabs of 16 query rows; for one
// key tile, on tensor cores (warp_gemm.cuh):
//   S = Q K^T    gemm_rows_rows  (Q and K from shared memory by ldmatrix)
//   then the score transform, the mask, the online softmax and (kDropout) dropout of P
//   O += P V     gemm_regs_trans (P straight from the S registers, V by ldmatrix.trans)
#pragma once
#include "common.cuh"
#include "dropout.cuh"
#include "mask.cuh"
#include "scores.cuh"
#include "softmax.cuh"
#include "tile_load.cuh"
#include "warp_gemm.cuh"

namespace cuflash {

// Compile-time shape of one forward specialisation.
template <class Elem, int kHeadDim_, int kHeadDimV_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kStages_>
struct FwdTraits {
  static constexpr bool kIsBf16 = Elem::kIsBf16;
  static constexpr int kPrec = Elem::kPrec;
  static constexpr int kWords = Elem::kWords;  // 16-bit units per element
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMRep = kBlockM / (16 * kNWarps);  // 16-row slabs per warp
  static constexpr int kNTiles = kBlockN / 8;             // n8 tiles of S
  static constexpr int kDTiles = kHeadDimV / 8;           // n8 tiles of O
  // Accumulator registers per thread (S and O); above 128, tile copies run rolled (float32
  // rows take twice the copy steps, each with its address: counted twice).
  static constexpr int kAccRegs = kMRep * (kNTiles + kDTiles) * 4;
  static constexpr bool kUnrollCopies = kAccRegs * kWords <= 128;

  static_assert(kBlockM % (16 * kNWarps) == 0, "kBlockM must be a multiple of 16 * kNWarps");
  static_assert(kBlockN % 16 == 0, "kBlockN must be a multiple of 16");
  static_assert(kHeadDim % 32 == 0 && kHeadDimV % 32 == 0, "head dims are bucketed by 32");
  static_assert(kStages == 1 || kStages == 2, "one or two K/V stages");

  // tiles in 16-bit units (a float32 row is twice as wide)
  using TileQ = SmemTile<kBlockM, kHeadDim * kWords>;
  using TileK = SmemTile<kBlockN, kHeadDim * kWords>;
  using TileV = SmemTile<kBlockN, kHeadDimV * kWords>;
  using TileO = SmemTile<kBlockM, kHeadDimV * kWords>;  // reuses Q's space in the epilogue

  static constexpr int kQBytes = TileQ::kBytes > TileO::kBytes ? TileQ::kBytes : TileO::kBytes;
  static constexpr int kSmemBytes = kQBytes + kStages * (TileK::kBytes + TileV::kBytes);
};

// The key/value loop of one thread block: tiles n_block_max-1 down to n_block_min (0
// unless a window bounds the keys on the left).
// kStages == 2: tile n-1 streams into the other stage during the whole step for tile n.
// kStages == 1 (FlashAttention-2's schedule, half the shared memory): V_n streams during
// S = Q K^T, and K_{n-1} during the softmax and P V.
template <class T, bool kCausal, bool kVec, bool kOptions, bool kDropout>
struct FwdMainloop {
  const u16* k_head;
  const u16* v_head;
  i64 k_row_stride, v_row_stride;
  int seqlen_k, head_dim, head_dim_v;
  int n_block_min;
  ScoreMod<kOptions, T::kPrec == kPrecTF32> scores;
  Mask<kCausal, kOptions> mask;
  Dropout<kDropout> dropout;
  u32 sQ;  // K and V stages follow Q's space: [K_0 V_0][K_1 V_1]
  int m0, warp_row0, tid;
  LanePatterns lp;

  static constexpr u32 kStageBytes = T::TileK::kBytes + T::TileV::kBytes;
  CUFLASH_DEVICE u32 sK(int st) const { return sQ + T::kQBytes + st * kStageBytes; }
  CUFLASH_DEVICE u32 sV(int st) const { return sK(st) + T::TileK::kBytes; }

  CUFLASH_DEVICE void load_k(int n, int st) const {
    load_tile<T::kBlockN, T::kHeadDim * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sK(st), k_head + i64(n) * T::kBlockN * k_row_stride, k_row_stride,
        seqlen_k - n * T::kBlockN, head_dim, tid);
  }
  CUFLASH_DEVICE void load_v(int n, int st) const {
    load_tile<T::kBlockN, T::kHeadDimV * T::kWords, T::kThreads, kVec, T::kUnrollCopies>(
        sV(st), v_head + i64(n) * T::kBlockN * v_row_stride, v_row_stride,
        seqlen_k - n * T::kBlockN, head_dim_v, tid);
  }

  // Issues the prologue copies (Q was issued by the caller): the first key tile.
  CUFLASH_DEVICE void prologue(int n_first) const {
    load_k(n_first, 0);
    if (T::kStages == 2) load_v(n_first, 0);
    cp_async_commit();
  }

  template <bool kMasked>
  CUFLASH_DEVICE void step(int n, int st, OnlineSoftmax<T::kMRep>& softmax,
                           float (&o_acc)[T::kMRep][T::kDTiles][4]) const {
    const int lane = tid & 31;
    cp_async_wait<0>();
    __syncthreads();
    if (T::kStages == 2) {
      if (n > n_block_min) {
        load_k(n - 1, st ^ 1);
        load_v(n - 1, st ^ 1);
      }
    } else {
      load_v(n, 0);
    }
    cp_async_commit();

    float s[T::kMRep][T::kNTiles][4];
    gemm_rows_rows<T::kPrec, T::kMRep, T::kBlockN, T::kHeadDim * T::kWords,
                   typename T::TileQ, typename T::TileK>(s, sQ, lp, sK(st));
    scores.apply(s, m0 + warp_row0, n * T::kBlockN, lane);
    if (kMasked) mask.apply(s, m0 + warp_row0, n * T::kBlockN, lane);

    if (T::kStages == 1) {
      cp_async_wait<0>();
      __syncthreads();
      if (n > n_block_min) load_k(n - 1, 0);
      cp_async_commit();
    }
    softmax.template update<kOptions>(s, o_acc, scores.units());
    // dropout after the row sums (l_i normalises over every key); finalize() scales by 1/(1-p)
    if constexpr (kDropout) {
      if (dropout.active()) dropout.template apply<false>(s, m0 + warp_row0, n * T::kBlockN, lane);
    }
    u32 p[T::kMRep][T::kBlockN / kKStep<T::kPrec>][4];
    pack_frags<T::kPrec, T::kMRep, T::kBlockN>(p, s);
    gemm_regs_trans<T::kPrec, T::kMRep, T::kHeadDimV, T::kBlockN, typename T::TileV>(
        o_acc, p, sV(st), lp);
  }

  // Masking regimes: the last tiles (ragged end of the keys, causal diagonal, right edge
  // of a window) take an element-wise mask, the bulk runs without one, and with a window
  // the first tiles (its left edge) take one again.
  CUFLASH_DEVICE void run(int n_block_max, OnlineSoftmax<T::kMRep>& softmax,
                          float (&o_acc)[T::kMRep][T::kDTiles][4]) const {
    int n = n_block_max - 1;
    int st = 0;
    for (; n >= n_block_min && needs_mask(n); --n) {
      step<true>(n, st, softmax, o_acc);
      st = T::kStages == 2 ? st ^ 1 : 0;
    }
    for (; n >= n_block_min && !(kOptions && needs_mask(n)); --n) {
      step<false>(n, st, softmax, o_acc);
      st = T::kStages == 2 ? st ^ 1 : 0;
    }
    if (kOptions) {
      for (; n >= n_block_min; --n) {
        step<true>(n, st, softmax, o_acc);
        st = T::kStages == 2 ? st ^ 1 : 0;
      }
    }
  }

  CUFLASH_DEVICE bool needs_mask(int n) const {
    return mask.template tile_needs_mask<T::kBlockN, T::kBlockM>(n, m0);
  }
};

}  // namespace cuflash
