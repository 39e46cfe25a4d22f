// cuflash: dQ of the backward pass with no atomics (deterministic=True); see
// mainloop_bwd_dq.cuh. The main backward kernel (flash_bwd.cu, kAtomicDQ = false) then
// writes only dK and dV.
#include "common.cuh"
#include "mainloop_bwd_dq.cuh"
#include "seqlens.cuh"

namespace cuflash {

template <class Elem, int kHeadDim, int kHeadDimV, int kBlockM, int kBlockN, int kNWarps,
          int kStages, int kMinBlocks, bool kCausal, bool kVec, bool kOptions, bool kDropout>
__global__ void __launch_bounds__(kNWarps * 32, kMinBlocks)
    flash_bwd_dq_kernel(const u16* __restrict__ q, const u16* __restrict__ k,
                        const u16* __restrict__ v, const u16* __restrict__ dout,
                        const float* __restrict__ lse_log2, const float* __restrict__ delta,
                        u16* __restrict__ dq, i64 q_batch_stride, i64 q_head_stride,
                        i64 q_row_stride, i64 k_batch_stride, i64 k_head_stride,
                        i64 k_row_stride, i64 v_batch_stride, i64 v_head_stride,
                        i64 v_row_stride, i64 do_batch_stride, i64 do_head_stride,
                        i64 do_row_stride, i64 dq_batch_stride, i64 dq_head_stride,
                        i64 dq_row_stride, int seqlen_q, int seqlen_k, int seqlen_q_pad,
                        int head_dim, int head_dim_v, int heads_per_kv, float scale_log2,
                        float scale, int window_left, int window_right, float softcap_in,
                        float softcap_out, const float* __restrict__ alibi_slopes,
                        i64 alibi_batch_stride, u32 dropout_threshold, float dropout_scale,
                        u64 dropout_seed, u32 dropout_bh0,
                        const int* __restrict__ cu_seqlens_q,
                        const int* __restrict__ cu_seqlens_k) {
  using T = BwdDqTraits<Elem, kHeadDim, kHeadDimV, kBlockM, kBlockN, kNWarps, kStages>;
  extern __shared__ unsigned char smem[];

  // Causal blocks are launched heaviest (last query rows) first.
  const int m_block = kCausal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int head = blockIdx.y;
  const i64 batch = blockIdx.z;
  const int kv_head = head / heads_per_kv;
  const int m0 = m_block * kBlockM;
  const SeqLens seq = SeqLens::get(cu_seqlens_q, cu_seqlens_k, int(batch), seqlen_q, seqlen_k);
  if (m0 >= seq.seqlen_q) return;  // packed: a shorter sequence than the grid's
  seqlen_q = seq.seqlen_q;
  seqlen_k = seq.seqlen_k;
  q += seq.q_start * q_row_stride;
  dout += seq.q_start * do_row_stride;
  k += seq.k_start * k_row_stride;
  v += seq.k_start * v_row_stride;
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp_row0 = (tid >> 5) * 16 * T::kMRep;
  const int rows_q = min(kBlockM, seqlen_q - m0);

  static_assert(!kDropout || kOptions, "the dropout kernels are options kernels");
  BwdDqMainloop<T, kCausal, kVec, kOptions, kDropout> mainloop;
  mainloop.k_head = k + batch * k_batch_stride + kv_head * k_head_stride;
  mainloop.v_head = v + batch * v_batch_stride + kv_head * v_head_stride;
  mainloop.k_row_stride = k_row_stride;
  mainloop.v_row_stride = v_row_stride;
  mainloop.seqlen_k = seqlen_k;
  mainloop.head_dim = head_dim;
  mainloop.head_dim_v = head_dim_v;
  mainloop.scale_log2 = scale_log2;
  mainloop.scores = decltype(mainloop.scores)::make(
      scale_log2, softcap_in, softcap_out,
      alibi_slopes ? alibi_slopes[batch * alibi_batch_stride + head] : 0.f, seqlen_k - seqlen_q);
  mainloop.mask = Mask<kCausal, kOptions>{seqlen_q, seqlen_k, window_left, window_right};
  mainloop.dropout = Dropout<kDropout>::make(dropout_threshold, dropout_seed,
                                             dropout_bh0 + u32(batch) * gridDim.y + head);
  mainloop.dropout_scale = dropout_scale;
  mainloop.smem = smem_addr(smem);
  mainloop.m0 = m0;
  mainloop.warp_row0 = warp_row0;
  mainloop.tid = tid;
  mainloop.lp.init(warp_row0, lane);
  // Row statistics are padded to whole tiles (seqlens.cuh): no bounds checks.
  const i64 stats = seq.stats_start(int(batch), gridDim.y, seqlen_q_pad) +
                    i64(head) * seqlen_q_pad + m0 + warp_row0 + (lane >> 2);
#pragma unroll
  for (int r = 0; r < T::kMRep; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mainloop.lse_log2[r][h] = lse_log2[stats + r * 16 + h * 8];
      mainloop.delta[r][h] = delta[stats + r * 16 + h * 8];
    }

  const int n_block_max = mainloop.mask.template n_block_max<kBlockN>(m0, kBlockM);
  mainloop.n_block_min = mainloop.mask.template n_block_min<kBlockN>(m0);
  float dq_acc[T::kMRep][T::kDTiles][4];
  zero_acc(dq_acc);
  if (n_block_max > mainloop.n_block_min) {
    load_tile<kBlockM, kHeadDim * T::kWords, T::kThreads, kVec>(
        mainloop.sQ(), q + batch * q_batch_stride + head * q_head_stride + m0 * q_row_stride,
        q_row_stride, rows_q, head_dim, tid);
    load_tile<kBlockM, kHeadDimV * T::kWords, T::kThreads, kVec>(
        mainloop.sDO(),
        dout + batch * do_batch_stride + head * do_head_stride + m0 * do_row_stride,
        do_row_stride, rows_q, head_dim_v, tid);
    if (T::kStages == 2) mainloop.load_kv(n_block_max - 1, 0);
    cp_async_commit();
    mainloop.run(n_block_max, dq_acc);
  }

  // Epilogue: dQ = scale * dq_acc through Q's shared memory.
  __syncthreads();
  store_frag<T::kPrec, typename T::TileQ>(mainloop.sQ(), dq_acc, warp_row0, 0, scale, lane);
  __syncthreads();
  // (the sequence's first row is read again here rather than held across the loop)
  const int row0 = SeqLens::get(cu_seqlens_q, cu_seqlens_k, block_index<2>(), 0, 0).q_start + m0;
  store_tile<kBlockM, kHeadDim * T::kWords, T::kThreads, kVec>(
      dq + batch * dq_batch_stride + head * dq_head_stride + row0 * dq_row_stride, dq_row_stride,
      rows_q, head_dim, mainloop.sQ(), tid);
}

}  // namespace cuflash
