// cuflash: the dropout keep mask as a tensor, for debugging and tests (cuflash.dropout_mask).
//
// One warp per 16 x 16 block of one (batch, head) runs the attention kernels' own code
// (dropout.cuh) on a block of ones: Dropout::apply, as the forward pass and the
// deterministic dQ pass hold the scores, or with kTransposed Dropout::apply_transposed, as
// the main backward kernel holds them. out[bh, i, j] = 1 where score (i, j) is kept.
#include "common.cuh"
#include "dropout.cuh"

namespace cuflash {

template <bool kTransposed>
__global__ void __launch_bounds__(32)
    dropout_mask_kernel(unsigned char* __restrict__ out, int seqlen_q, int seqlen_k,
                        u32 threshold, u64 seed) {
  const int lane = threadIdx.x;
  const int key0 = blockIdx.x * 16, query0 = blockIdx.y * 16;
  const u32 bh = blockIdx.z;
  const Dropout<true> dropout = Dropout<true>::make(threshold, seed, bh);
  float s[1][2][4];
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[0][n][e] = 1.f;
  // element e of n8 tile n: row g + 8 (e >> 1), column 8n + 2t + (e & 1) of the block,
  // with rows = queries (or keys, transposed)
  if (kTransposed) {
    dropout.template apply_transposed<false>(s, key0, query0, lane);
  } else {
    dropout.template apply<false>(s, query0, key0, lane);
  }
  unsigned char* out_bh = out + i64(bh) * seqlen_q * seqlen_k;
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = (lane >> 2) + 8 * (e >> 1), col = 8 * n + 2 * (lane & 3) + (e & 1);
      const int i = query0 + (kTransposed ? col : row), j = key0 + (kTransposed ? row : col);
      if (i < seqlen_q && j < seqlen_k) out_bh[i64(i) * seqlen_k + j] = s[0][n][e] != 0.f;
    }
}

}  // namespace cuflash
