// cuflash: the forward epilogue. o_acc (already divided by l_i) is rounded to the
// input precision (float32: kept), staged through shared memory (Q's space, each warp on its own rows)
// and written out with 16-byte row-coalesced stores; lse goes straight from registers.
#pragma once
#include "common.cuh"
#include "tile_load.cuh"
#include "warp_gemm.cuh"

namespace cuflash {

template <class T, bool kVec>
CUFLASH_DEVICE void store_output(u16* __restrict__ o_tile, i64 o_row_stride,
                                 float* __restrict__ lse_tile, int rows_valid, int head_dim_v,
                                 const float (&o_acc)[T::kMRep][T::kDTiles][4],
                                 const float (&lse)[T::kMRep][2], u32 sO, int warp_row0,
                                 int tid) {
  const int lane = tid & 31;
  store_frag<T::kPrec, typename T::TileO>(sO, o_acc, warp_row0, 0, 1.f, lane);
#pragma unroll
  for (int r = 0; r < T::kMRep; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + r * 16 + (lane >> 2) + h * 8;
      if ((lane & 3) == 0 && row < rows_valid) lse_tile[row] = lse[r][h];
    }
  }
  __syncthreads();
  store_tile<T::kBlockM, T::kHeadDimV * T::kWords, T::kThreads, kVec>(
      o_tile, o_row_stride, rows_valid, head_dim_v, sO, tid);
}

}  // namespace cuflash
