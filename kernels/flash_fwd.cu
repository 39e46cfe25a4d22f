// cuflash: fused attention forward, FlashAttention-2 style (Dao 2023), for sm_80 and newer.
//
// One thread block owns kBlockM query rows of one (batch, head) and walks the key/value
// tiles from the last to the first. Per tile:
//   tile load   K_j, V_j -> shared memory (cp.async, double-buffered)   tile_load.cuh
//   S = Q K_j^T on tensor cores                                         warp_gemm.cuh
//   scale (kOptions: softcap, ALiBi), in log2 units                     scores.cuh
//   mask (only on the ragged/diagonal/window-edge tiles)                mask.cuh
//   online softmax: m_i, l_i, rescale of o_acc, P = exp2(S - m_i)        softmax.cuh
//   dropout of P (kDropout), after the row sums                         dropout.cuh
//   O += P V_j                                                          warp_gemm.cuh
// then o_acc / l_i and lse are written once                             epilogue_fwd.cuh
// The score matrix never reaches global memory. The host side picks the template
// arguments (cuflash/_dispatch.py) and compiles one module per specialisation with NVRTC.
#include "common.cuh"
#include "epilogue_fwd.cuh"
#include "mainloop_fwd.cuh"
#include "seqlens.cuh"

namespace cuflash {

template <class Elem, int kHeadDim, int kHeadDimV, int kBlockM, int kBlockN, int kNWarps,
          int kStages, int kMinBlocks, bool kCausal, bool kVec, bool kOptions, bool kDropout>
__global__ void __launch_bounds__(kNWarps * 32, kMinBlocks)
    flash_fwd_kernel(const u16* __restrict__ q, const u16* __restrict__ k,
                     const u16* __restrict__ v, u16* __restrict__ o, float* __restrict__ lse,
                     i64 q_batch_stride, i64 q_head_stride, i64 q_row_stride,
                     i64 k_batch_stride, i64 k_head_stride, i64 k_row_stride,
                     i64 v_batch_stride, i64 v_head_stride, i64 v_row_stride,
                     i64 o_batch_stride, i64 o_head_stride, i64 o_row_stride,
                     i64 lse_batch_stride, i64 lse_head_stride, int seqlen_q, int seqlen_k,
                     int head_dim, int head_dim_v, int heads_per_kv, float scale_log2,
                     int window_left, int window_right, float softcap_in, float softcap_out,
                     const float* __restrict__ alibi_slopes, i64 alibi_batch_stride,
                     u32 dropout_threshold, float dropout_scale, u64 dropout_seed,
                     u32 dropout_bh0, const int* __restrict__ cu_seqlens_q,
                     const int* __restrict__ cu_seqlens_k) {
  using T = FwdTraits<Elem, kHeadDim, kHeadDimV, kBlockM, kBlockN, kNWarps, kStages>;
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
  k += seq.k_start * k_row_stride;
  v += seq.k_start * v_row_stride;
  const int tid = threadIdx.x;
  const int warp_row0 = (tid >> 5) * 16 * T::kMRep;
  const int rows_q = min(kBlockM, seqlen_q - m0);

  const Mask<kCausal, kOptions> mask{seqlen_q, seqlen_k, window_left, window_right};
  const int n_block_max = mask.template n_block_max<kBlockN>(m0, kBlockM);
  const int n_block_min = mask.template n_block_min<kBlockN>(m0);

  static_assert(!kDropout || kOptions, "the dropout kernels are options kernels");
  FwdMainloop<T, kCausal, kVec, kOptions, kDropout> mainloop;
  mainloop.k_head = k + batch * k_batch_stride + kv_head * k_head_stride;
  mainloop.v_head = v + batch * v_batch_stride + kv_head * v_head_stride;
  mainloop.k_row_stride = k_row_stride;
  mainloop.v_row_stride = v_row_stride;
  mainloop.seqlen_k = seqlen_k;
  mainloop.head_dim = head_dim;
  mainloop.head_dim_v = head_dim_v;
  mainloop.n_block_min = n_block_min;
  mainloop.scores = decltype(mainloop.scores)::make(
      scale_log2, softcap_in, softcap_out,
      alibi_slopes ? alibi_slopes[batch * alibi_batch_stride + head] : 0.f, seqlen_k - seqlen_q);
  mainloop.mask = mask;
  mainloop.dropout = Dropout<kDropout>::make(
      dropout_threshold, dropout_seed, dropout_bh0 + u32(batch) * gridDim.y + head);
  mainloop.sQ = smem_addr(smem);
  mainloop.m0 = m0;
  mainloop.warp_row0 = warp_row0;
  mainloop.tid = tid;
  mainloop.lp.init(warp_row0, tid & 31);

  float o_acc[T::kMRep][T::kDTiles][4];
#pragma unroll
  for (int r = 0; r < T::kMRep; ++r)
#pragma unroll
    for (int d = 0; d < T::kDTiles; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[r][d][e] = 0.f;
  OnlineSoftmax<T::kMRep> softmax;
  softmax.init();

  if (n_block_max > n_block_min) {
    const u16* q_tile = q + batch * q_batch_stride + head * q_head_stride + m0 * q_row_stride;
    load_tile<kBlockM, kHeadDim * T::kWords, T::kThreads, kVec>(mainloop.sQ, q_tile,
                                                                q_row_stride, rows_q, head_dim,
                                                                tid);
    mainloop.prologue(n_block_max - 1);
    mainloop.run(n_block_max, softmax, o_acc);
  }

  float lse_rows[T::kMRep][2];
  softmax.finalize(o_acc, lse_rows, mainloop.scores.units(),
                   mainloop.dropout.active() ? dropout_scale : 1.f);
  // (the sequence's first row is read again here rather than held across the loop)
  const int row0 = SeqLens::get(cu_seqlens_q, cu_seqlens_k, block_index<2>(), 0, 0).q_start + m0;
  u16* o_tile = o + batch * o_batch_stride + head * o_head_stride + row0 * o_row_stride;
  float* lse_tile = lse + batch * lse_batch_stride + head * lse_head_stride + row0;
  store_output<T, kVec>(o_tile, o_row_stride, lse_tile, rows_q, head_dim_v, o_acc, lse_rows, mainloop.sQ,
                        warp_row0, tid);
}

}  // namespace cuflash
