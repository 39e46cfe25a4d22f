// cuflash: the backward pass's two small element-wise kernels.
//
// flash_bwd_preprocess_kernel, before the main kernel, one warp per query row:
//   delta_i    = sum_d dO_id * O_id   (float32; the rowsum of dP o P, in closed form)
//   lse_log2_i = lse_i * log2(e), or +inf for a row that sees no key (lse = -inf), so that
//                P = exp2(S * scale * log2(e) - lse_log2) is 0 there instead of NaN.
// Rows seqlen_q .. seqlen_q_pad - 1 are padding: delta 0, lse_log2 +inf, so the main
// kernel reads whole tiles of statistics and padded query rows contribute nothing. For
// packed sequences each is padded to a multiple of kStatsRowPad rows (seqlens.cuh).
//
// flash_bwd_convert_dq_kernel, after it: dQ = scale * dq_accum, rounded to fp16/bf16
// (float32: kept);
// dq_accum's tiles are in the main kernel's fragment order (DqAccumLayout).
#include "common.cuh"
#include "seqlens.cuh"

namespace cuflash {

constexpr int kPrepWarps = 8;

// Element d of a row addressed in 16-bit units (common.cuh), as float, and back.
template <class Elem>
CUFLASH_DEVICE float load_float(const u16* row, int d) {
  if (Elem::kWords == 2) return reinterpret_cast<const float*>(row)[d];
  return to_float<Elem::kIsBf16>(row[d]);
}
template <class Elem>
CUFLASH_DEVICE void store_float(u16* row, int d, float x) {
  if (Elem::kWords == 2) {
    reinterpret_cast<float*>(row)[d] = x;
  } else {
    row[d] = from_float<Elem::kIsBf16>(x);
  }
}

template <class Elem>
__global__ void __launch_bounds__(kPrepWarps * 32)
    flash_bwd_preprocess_kernel(const u16* __restrict__ out, const u16* __restrict__ dout,
                                const float* __restrict__ lse, float* __restrict__ lse_log2,
                                float* __restrict__ delta, i64 o_batch_stride,
                                i64 o_head_stride, i64 o_row_stride, i64 do_batch_stride,
                                i64 do_head_stride, i64 do_row_stride, i64 lse_batch_stride,
                                i64 lse_head_stride, i64 lse_row_stride, int seqlen_q,
                                int seqlen_q_pad, int head_dim_v,
                                const int* __restrict__ cu_seqlens_q) {
  const int row = blockIdx.x * kPrepWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int head = blockIdx.y;
  const i64 batch = blockIdx.z;
  const SeqLens seq = SeqLens::get(cu_seqlens_q, cu_seqlens_q, int(batch), seqlen_q, 0);
  const int rows_pad = seq.packed
      ? (seq.seqlen_q + kStatsRowPad - 1) / kStatsRowPad * kStatsRowPad : seqlen_q_pad;
  if (row >= rows_pad) return;
  seqlen_q = seq.seqlen_q;
  out += seq.q_start * o_row_stride;
  dout += seq.q_start * do_row_stride;
  lse += seq.q_start * lse_row_stride;
  float dot = 0.f;
  float l2 = pos_inf();
  if (row < seqlen_q) {
    const u16* o_row = out + batch * o_batch_stride + head * o_head_stride + row * o_row_stride;
    const u16* do_row =
        dout + batch * do_batch_stride + head * do_head_stride + row * do_row_stride;
    for (int d = lane; d < head_dim_v; d += 32) {
      dot = fmaf(load_float<Elem>(o_row, d), load_float<Elem>(do_row, d), dot);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float l = lse[batch * lse_batch_stride + head * lse_head_stride + row * lse_row_stride];
    l2 = l == neg_inf() ? pos_inf() : l * kLog2e;
  }
  if (lane == 0) {
    const i64 i = seq.stats_start(int(batch), gridDim.y, seqlen_q_pad) +
                  i64(head) * seqlen_q_pad + row;
    delta[i] = dot;
    lse_log2[i] = l2;
  }
}

// Where element (row, col) of a kBlockM x head_dim_pad tile of dq_accum lives: the main
// kernel's warps store their dQ fragments whole (mainloop_bwd.cuh, accumulate_dq). The
// tile is split into warps_m x (head_dim_pad / cols) warp tiles of 16 * mrep rows and
// `cols` columns; inside one, fragment (slab r, n8 tile n) is 32 lanes x 4 floats.
struct DqAccumLayout {
  int block_m, mrep, cols, warps_m, head_dim_pad;

  CUFLASH_DEVICE i64 offset(int row, int col) const {
    const int tile = row / block_m, rr = row - tile * block_m;
    const int wm = rr / (16 * mrep), r = (rr >> 4) % mrep, h = (rr >> 3) & 1, g = rr & 7;
    const int wn = col / cols, cc = col - wn * cols;
    const int warp = wm + wn * warps_m, lane = g * 4 + ((cc & 7) >> 1);
    const int frag = (warp * mrep + r) * (cols / 8) + (cc >> 3);
    return i64(tile) * block_m * head_dim_pad + frag * 128 + lane * 4 + h * 2 + (cc & 1);
  }
};

template <class Elem>
__global__ void __launch_bounds__(256)
    flash_bwd_convert_dq_kernel(const float* __restrict__ dq_accum, u16* __restrict__ dq,
                                i64 dq_batch_stride, i64 dq_head_stride, i64 dq_row_stride,
                                int seqlen_q, int seqlen_q_pad, int head_dim,
                                int head_dim_pad, int block_m, int dq_mrep, int dq_cols,
                                int dq_warps_m, float scale,
                                const int* __restrict__ cu_seqlens_q) {
  const DqAccumLayout layout{block_m, dq_mrep, dq_cols, dq_warps_m, head_dim_pad};
  const i64 batch = blockIdx.z;
  const SeqLens seq = SeqLens::get(cu_seqlens_q, cu_seqlens_q, int(batch), seqlen_q, 0);
  const i64 idx = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= i64(seq.seqlen_q) * head_dim) return;
  const int row = int(idx / head_dim);
  const int d = int(idx - i64(row) * head_dim);
  const int head = blockIdx.y;
  const i64 stats_row = seq.stats_start(int(batch), gridDim.y, seqlen_q_pad) +
                        i64(head) * seqlen_q_pad;
  const float x = dq_accum[stats_row * layout.head_dim_pad + layout.offset(row, d)] * scale;
  store_float<Elem>(dq + batch * dq_batch_stride + head * dq_head_stride +
                        (seq.q_start + row) * dq_row_stride, d, x);
}

}  // namespace cuflash
