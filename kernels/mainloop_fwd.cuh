// cuflash: the forward main loop's two matrix products, on tensor cores (mma.sync m16n8k16).
//
// Each warp owns kMRep slabs of 16 query rows. For one key tile:
//   gemm_qk: S = Q K^T   (A = Q from shared memory by ldmatrix, B = K rows by ldmatrix)
//   gemm_pv: O += P V    (A = P straight from the S registers, B = V by ldmatrix.trans)
// The C fragment of two neighbouring n8 tiles of S is exactly the A fragment of one k16
// step of P V, so P never leaves registers.
#pragma once
#include "common.cuh"
#include "mask.cuh"
#include "softmax.cuh"
#include "tile_load.cuh"

namespace cuflash {

// Compile-time shape of one forward specialisation.
template <class Elem, int kHeadDim_, int kHeadDimV_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kStages_>
struct FwdTraits {
  static constexpr bool kIsBf16 = Elem::kIsBf16;
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
  // Accumulator registers per thread (S and O); above 128, tile copies run rolled.
  static constexpr int kAccRegs = kMRep * (kNTiles + kDTiles) * 4;
  static constexpr bool kUnrollCopies = kAccRegs <= 128;

  static_assert(kBlockM % (16 * kNWarps) == 0, "kBlockM must be a multiple of 16 * kNWarps");
  static_assert(kBlockN % 16 == 0, "kBlockN must be a multiple of 16");
  static_assert(kHeadDim % 32 == 0 && kHeadDimV % 32 == 0, "head dims are bucketed by 32");
  static_assert(kStages == 1 || kStages == 2, "one or two K/V stages");

  using TileQ = SmemTile<kBlockM, kHeadDim>;
  using TileK = SmemTile<kBlockN, kHeadDim>;
  using TileV = SmemTile<kBlockN, kHeadDimV>;
  using TileO = SmemTile<kBlockM, kHeadDimV>;  // reuses Q's space in the epilogue

  static constexpr int kQBytes = TileQ::kBytes > TileO::kBytes ? TileQ::kBytes : TileO::kBytes;
  static constexpr int kSmemBytes = kQBytes + kStages * (TileK::kBytes + TileV::kBytes);
};

// Per-lane ldmatrix offsets of the three operands (see SmemTile::lane_offsets).
template <class T>
struct FwdLaneOffsets {
  typename T::TileQ::LaneOffsets q;  // A of S = Q K^T: rows 0-15, chunks +0 | +1
  typename T::TileK::LaneOffsets k;  // B of S: keys 0-7 | 0-7 | 8-15 | 8-15, chunks +0 | +1 | +0 | +1
  typename T::TileV::LaneOffsets v;  // B of O += P V (.trans): keys 0-7 | 8-15 | 0-7 | 8-15, chunks +0 | +0 | +1 | +1

  CUFLASH_DEVICE void init(int warp_row0, int lane) {
    q = T::TileQ::lane_offsets(warp_row0 + (lane & 15), lane >> 4);
    k = T::TileK::lane_offsets(((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1);
    v = T::TileV::lane_offsets((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
  }
};

// S = Q K^T for this warp's kMRep slabs of 16 rows. s is zeroed here.
template <class T>
CUFLASH_DEVICE void gemm_qk(float (&s)[T::kMRep][T::kNTiles][4], u32 sQ, u32 sK,
                            const FwdLaneOffsets<T>& lo) {
#pragma unroll
  for (int r = 0; r < T::kMRep; ++r)
#pragma unroll
    for (int n = 0; n < T::kNTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[r][n][e] = 0.f;

#pragma unroll
  for (int kk = 0; kk < T::kHeadDim / 16; ++kk) {
    u32 a[T::kMRep][4];
#pragma unroll
    for (int r = 0; r < T::kMRep; ++r) {
      ldmatrix_x4(a[r], T::TileQ::ldsm(sQ, lo.q, r * 16, 2 * kk));
    }
#pragma unroll
    for (int nn = 0; nn < T::kBlockN / 16; ++nn) {
      u32 b[4];
      ldmatrix_x4(b, T::TileK::ldsm(sK, lo.k, nn * 16, 2 * kk));
#pragma unroll
      for (int r = 0; r < T::kMRep; ++r) {
        mma_16816<T::kIsBf16>(s[r][2 * nn], a[r], b[0], b[1]);
        mma_16816<T::kIsBf16>(s[r][2 * nn + 1], a[r], b[2], b[3]);
      }
    }
  }
}

// O += P V, with p the probabilities left in the S registers by the softmax.
template <class T>
CUFLASH_DEVICE void gemm_pv(float (&o_acc)[T::kMRep][T::kDTiles][4],
                            const float (&p)[T::kMRep][T::kNTiles][4], u32 sV,
                            const FwdLaneOffsets<T>& lo) {
#pragma unroll
  for (int kk = 0; kk < T::kBlockN / 16; ++kk) {
    u32 a[T::kMRep][4];
#pragma unroll
    for (int r = 0; r < T::kMRep; ++r) {
      a[r][0] = pack2<T::kIsBf16>(p[r][2 * kk][0], p[r][2 * kk][1]);
      a[r][1] = pack2<T::kIsBf16>(p[r][2 * kk][2], p[r][2 * kk][3]);
      a[r][2] = pack2<T::kIsBf16>(p[r][2 * kk + 1][0], p[r][2 * kk + 1][1]);
      a[r][3] = pack2<T::kIsBf16>(p[r][2 * kk + 1][2], p[r][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dd = 0; dd < T::kHeadDimV / 16; ++dd) {
      u32 b[4];
      ldmatrix_x4_trans(b, T::TileV::ldsm(sV, lo.v, kk * 16, 2 * dd));
#pragma unroll
      for (int r = 0; r < T::kMRep; ++r) {
        mma_16816<T::kIsBf16>(o_acc[r][2 * dd], a[r], b[0], b[1]);
        mma_16816<T::kIsBf16>(o_acc[r][2 * dd + 1], a[r], b[2], b[3]);
      }
    }
  }
}

// The key/value loop of one thread block: tiles n_block_max-1 down to 0.
// kStages == 2: tile n-1 streams into the other stage during the whole step for tile n.
// kStages == 1 (FlashAttention-2's schedule, half the shared memory): V_n streams during
// S = Q K^T, and K_{n-1} during the softmax and P V.
template <class T, bool kCausal, bool kVec>
struct FwdMainloop {
  const u16* k_head;
  const u16* v_head;
  i64 k_row_stride, v_row_stride;
  int seqlen_k, head_dim, head_dim_v;
  float scale_log2;
  Mask<kCausal> mask;
  u32 sQ;  // K and V stages follow Q's space: [K_0 V_0][K_1 V_1]
  int m0, warp_row0, tid;
  FwdLaneOffsets<T> lane_offsets;

  static constexpr u32 kStageBytes = T::TileK::kBytes + T::TileV::kBytes;
  CUFLASH_DEVICE u32 sK(int st) const { return sQ + T::kQBytes + st * kStageBytes; }
  CUFLASH_DEVICE u32 sV(int st) const { return sK(st) + T::TileK::kBytes; }

  CUFLASH_DEVICE void load_k(int n, int st) const {
    load_tile<T::kBlockN, T::kHeadDim, T::kThreads, kVec, T::kUnrollCopies>(
        sK(st), k_head + i64(n) * T::kBlockN * k_row_stride, k_row_stride,
        seqlen_k - n * T::kBlockN, head_dim, tid);
  }
  CUFLASH_DEVICE void load_v(int n, int st) const {
    load_tile<T::kBlockN, T::kHeadDimV, T::kThreads, kVec, T::kUnrollCopies>(
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
      if (n > 0) {
        load_k(n - 1, st ^ 1);
        load_v(n - 1, st ^ 1);
      }
    } else {
      load_v(n, 0);
    }
    cp_async_commit();

    float s[T::kMRep][T::kNTiles][4];
    gemm_qk<T>(s, sQ, sK(st), lane_offsets);
#pragma unroll
    for (int r = 0; r < T::kMRep; ++r)
#pragma unroll
      for (int j = 0; j < T::kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[r][j][e] *= scale_log2;
    if (kMasked) mask.apply(s, m0 + warp_row0, n * T::kBlockN, lane);

    if (T::kStages == 1) {
      cp_async_wait<0>();
      __syncthreads();
      if (n > 0) load_k(n - 1, 0);
      cp_async_commit();
    }
    softmax.update(s, o_acc);
    gemm_pv<T>(o_acc, s, sV(st), lane_offsets);
  }

  // Masking regimes: the last tiles (ragged end of the keys, causal diagonal) take an
  // element-wise mask; the bulk runs without one.
  CUFLASH_DEVICE void run(int n_block_max, OnlineSoftmax<T::kMRep>& softmax,
                          float (&o_acc)[T::kMRep][T::kDTiles][4]) const {
    int n = n_block_max - 1;
    int st = 0;
    for (; n >= 0 && mask.template tile_needs_mask<T::kBlockN>(n, m0); --n) {
      step<true>(n, st, softmax, o_acc);
      st = T::kStages == 2 ? st ^ 1 : 0;
    }
    for (; n >= 0; --n) {
      step<false>(n, st, softmax, o_acc);
      st = T::kStages == 2 ? st ^ 1 : 0;
    }
  }
};

}  // namespace cuflash
