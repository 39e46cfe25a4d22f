// cuflash: the forward epilogue. o_acc (already divided by l_i) is rounded to the
// input precision, staged through shared memory (Q's space, each warp on its own rows)
// and written out with 16-byte row-coalesced stores; lse goes straight from registers.
#pragma once
#include "common.cuh"
#include "tile_load.cuh"

namespace cuflash {

template <class T, bool kVec>
CUFLASH_DEVICE void store_output(u16* __restrict__ o_tile, i64 o_row_stride,
                                 float* __restrict__ lse_tile, int rows_valid, int head_dim_v,
                                 const float (&o_acc)[T::kMRep][T::kDTiles][4],
                                 const float (&lse)[T::kMRep][2], u32 sO, int warp_row0,
                                 int tid) {
  const int lane = tid & 31;
#pragma unroll
  for (int r = 0; r < T::kMRep; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + r * 16 + (lane >> 2) + h * 8;
#pragma unroll
      for (int d = 0; d < T::kDTiles; ++d) {
        // columns 8d + 2(lane%4), +1: one 4-byte word inside chunk d
        const u32 addr = sO + T::TileO::offset(row, d) + (lane & 3) * 4;
        st_shared_b32(addr, pack2<T::kIsBf16>(o_acc[r][d][2 * h], o_acc[r][d][2 * h + 1]));
      }
      if ((lane & 3) == 0 && row < rows_valid) lse_tile[row] = lse[r][h];
    }
  }
  __syncthreads();
  store_tile<T::kBlockM, T::kHeadDimV, T::kThreads, kVec>(o_tile, o_row_stride, rows_valid,
                                                           head_dim_v, sO, tid);
}

}  // namespace cuflash
