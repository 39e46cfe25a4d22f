// cuflash: fused attention backward, FlashAttention-2 style (Dao 2023), for sm_80 and newer.
//
// The pass runs in up to four launches (cuflash/_dispatch.py):
//   1. flash_bwd_preprocess_kernel: delta = rowsum(dO o O), lse in log2 units   flash_bwd_prep.cu
//   2. flash_bwd_kernel (this file): one block per key tile; dK, dV, and with
//      kAtomicDQ dQ by float atomics                                            mainloop_bwd.cuh
//   3. deterministic mode: flash_bwd_dq_kernel, one block per query tile, dQ
//      with no atomics                                                          flash_bwd_dq.cu
//   4. without it: flash_bwd_convert_dq_kernel, float32 dQ -> fp16/bf16          flash_bwd_prep.cu
// The probabilities are recomputed from the saved lse; no score matrix is stored.
#include "common.cuh"
#include "mainloop_bwd.cuh"
#include "seqlens.cuh"

namespace cuflash {

// Which block owns which keys. Causal blocks differ in work (key tile 0 sees every query
// tile, the last one the fewest), so their grid is (heads, batch, key tiles): the hardware
// launches x fastest, so every head's tile 0 starts first and the light blocks fill the
// tail. Otherwise (key tiles, heads, batch): neighbouring blocks share a head's Q and dO
// in L2.
template <bool kCausal>
struct BwdBlock {
  int n_block, kv_head, batch;
  static CUFLASH_DEVICE BwdBlock get() {
    if (kCausal) return {block_index<2>(), block_index<0>(), block_index<1>()};
    return {block_index<0>(), block_index<1>(), block_index<2>()};
  }
};

template <class Elem, int kHeadDim, int kHeadDimV, int kBlockM, int kBlockN, int kNWarps,
          int kDSplit, int kStages, int kMinBlocks, bool kCausal, bool kVec, bool kAtomicDQ,
          bool kSwap, bool kOptions, bool kDropout>
__global__ void __launch_bounds__(kNWarps * 32, kMinBlocks)
    flash_bwd_kernel(const u16* __restrict__ q, const u16* __restrict__ k,
                     const u16* __restrict__ v, const u16* __restrict__ dout,
                     const float* __restrict__ lse_log2, const float* __restrict__ delta,
                     float* __restrict__ dq_accum, u16* __restrict__ dk, u16* __restrict__ dv,
                     i64 q_batch_stride, i64 q_head_stride, i64 q_row_stride,
                     i64 k_batch_stride, i64 k_head_stride, i64 k_row_stride,
                     i64 v_batch_stride, i64 v_head_stride, i64 v_row_stride,
                     i64 do_batch_stride, i64 do_head_stride, i64 do_row_stride,
                     i64 dk_batch_stride, i64 dk_head_stride, i64 dk_row_stride,
                     i64 dv_batch_stride, i64 dv_head_stride, i64 dv_row_stride,
                     int seqlen_q, int seqlen_k, int seqlen_q_pad, int num_heads_q,
                     int head_dim, int head_dim_v, int heads_per_kv, float scale_log2,
                     float scale, int window_left, int window_right, float softcap_in,
                     float softcap_out, const float* __restrict__ alibi_slopes,
                     i64 alibi_batch_stride, u32 dropout_threshold, float dropout_scale,
                     u64 dropout_seed, u32 dropout_bh0, const int* __restrict__ cu_seqlens_q,
                     const int* __restrict__ cu_seqlens_k) {
  using T = BwdTraits<Elem, kHeadDim, kHeadDimV, kBlockM, kBlockN, kNWarps, kDSplit, kStages,
                      kAtomicDQ, kSwap>;
  extern __shared__ unsigned char smem[];

  const BwdBlock<kCausal> block = BwdBlock<kCausal>::get();
  const int n_block = block.n_block, kv_head = block.kv_head;
  const i64 batch = block.batch;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int n0 = n_block * kBlockN;
  const SeqLens seq = SeqLens::get(cu_seqlens_q, cu_seqlens_k, int(batch), seqlen_q, seqlen_k);
  if (n0 >= seq.seqlen_k) return;  // packed: a shorter sequence than the grid's
  seqlen_q = seq.seqlen_q;
  seqlen_k = seq.seqlen_k;

  static_assert(!kDropout || kOptions, "the dropout kernels are options kernels");
  BwdMainloop<T, kCausal, kVec, kOptions, kDropout> mainloop;
  mainloop.q = q;
  mainloop.dout = dout;
  mainloop.q_batch_stride = q_batch_stride;
  mainloop.q_head_stride = q_head_stride;
  mainloop.q_row_stride = q_row_stride;
  mainloop.do_batch_stride = do_batch_stride;
  mainloop.do_head_stride = do_head_stride;
  mainloop.do_row_stride = do_row_stride;
  mainloop.lse_log2 = lse_log2;
  mainloop.delta = delta;
  mainloop.dq_accum = dq_accum;
  mainloop.batch = int(batch);
  mainloop.cu_seqlens_q = cu_seqlens_q;
  mainloop.num_heads_q = num_heads_q;
  mainloop.seqlen_q = seqlen_q;
  mainloop.seqlen_q_pad = seqlen_q_pad;
  mainloop.head_dim = head_dim;
  mainloop.head_dim_v = head_dim_v;
  mainloop.head0 = kv_head * heads_per_kv;
  mainloop.mask = Mask<kCausal, kOptions>{seqlen_q, seqlen_k, window_left, window_right};
  mainloop.m_block_min = mainloop.mask.template m_block_min<kBlockM>(n0);
  mainloop.m_block_end = mainloop.mask.template m_block_end<kBlockM, kBlockN>(n0);
  mainloop.n_block = n_block;
  mainloop.scale_log2 = scale_log2;
  mainloop.softcap_in = softcap_in;
  mainloop.softcap_out = softcap_out;
  mainloop.alibi_slopes = alibi_slopes;
  mainloop.alibi_batch_stride = alibi_batch_stride;
  mainloop.dropout = Dropout<kDropout>::make(dropout_threshold, dropout_seed,
                                             dropout_bh0 + u32(batch) * num_heads_q);
  mainloop.dropout_scale = dropout_scale;
  mainloop.smem = smem_addr(smem);
  mainloop.tid = tid;
  mainloop.key_row0 = (warp / kDSplit) * 16 * T::kNRep;
  mainloop.d_part = warp % kDSplit;
  mainloop.lp.init(mainloop.key_row0, tid & 31);

  const int tiles = max(0, mainloop.m_block_end - mainloop.m_block_min);
  const int n_iters = tiles * heads_per_kv;
  const int rows_k = min(kBlockN, seqlen_k - n0);
  const u16* k_tile = k + batch * k_batch_stride + kv_head * k_head_stride +
                      (seq.k_start + n0) * k_row_stride;
  const u16* v_tile = v + batch * v_batch_stride + kv_head * v_head_stride +
                      (seq.k_start + n0) * v_row_stride;
  mainloop.prologue(k_tile, k_row_stride, v_tile, v_row_stride, rows_k, n_iters);

  float dk_acc[T::kNRep][T::kDKCols / 8][4];
  float dv_acc[T::kNRep][T::kDVCols / 8][4];
  zero_acc(dk_acc);
  zero_acc(dv_acc);
  mainloop.run(n_iters, dk_acc, dv_acc);

  // Epilogue: dK (times scale) and dV through K's and V's shared memory. Indices are read
  // afresh (BwdBlock / thread_index), so that nothing from before the loop has to
  // stay live across it just for the stores.
  __syncthreads();
  {
    const int tid_e = thread_index(), warp_e = tid_e >> 5, lane = tid_e & 31;
    const int key_row0 = (warp_e / kDSplit) * 16 * T::kNRep, d_part = warp_e % kDSplit;
    const u32 sK = smem_addr(smem), sV = sK + T::TileK::kBytes;
    store_frag<T::kPrec, typename T::TileK>(sK, dk_acc, key_row0, d_part * T::kDKCols, scale,
                                              lane);
    // dropout: dV = (P o Z)^T dO / (1 - p)
    const float dv_scale = kDropout && dropout_threshold != 0u ? dropout_scale : 1.f;
    store_frag<T::kPrec, typename T::TileV>(sV, dv_acc, key_row0, d_part * T::kDVCols,
                                              dv_scale, lane);
    __syncthreads();
    const BwdBlock<kCausal> blk = BwdBlock<kCausal>::get();
    const i64 b = blk.batch;
    const SeqLens seq_e = SeqLens::get(cu_seqlens_q, cu_seqlens_k, int(b), 0, seqlen_k);
    const int kv = blk.kv_head, n0_e = blk.n_block * kBlockN + seq_e.k_start;
    const int rows = min(kBlockN, seq_e.seqlen_k + seq_e.k_start - n0_e);
    store_tile<kBlockN, kHeadDim * T::kWords, T::kThreads, kVec>(
        dk + b * dk_batch_stride + kv * dk_head_stride + n0_e * dk_row_stride, dk_row_stride,
        rows, head_dim, sK, tid_e);
    store_tile<kBlockN, kHeadDimV * T::kWords, T::kThreads, kVec>(
        dv + b * dv_batch_stride + kv * dv_head_stride + n0_e * dv_row_stride, dv_row_stride,
        rows, head_dim_v, sV, tid_e);
  }
}

}  // namespace cuflash
