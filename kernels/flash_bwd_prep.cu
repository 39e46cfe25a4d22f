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
// (float32: kept); dq_accum's tiles are in the main kernel's fragment order
// (DqAccumLayout), which the conversion reads in order, a float4 a thread.
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

// This lane's part of sum_d a_d b_d over a row of n elements: 8 bytes a load where both
// rows are 8-byte aligned and whole (a warp then reads 256 bytes a row at once), else an
// element at a time.
template <class Elem>
CUFLASH_DEVICE float row_dot(const u16* a, const u16* b, int n, int lane) {
  const int words = n * Elem::kWords;  // 16-bit units
  float dot = 0.f;
  if (words % 4 == 0 && ((reinterpret_cast<size_t>(a) | reinterpret_cast<size_t>(b)) & 7u) == 0) {
    for (int w = lane * 4; w < words; w += 32 * 4) {
      const uint2 x = *reinterpret_cast<const uint2*>(a + w);
      const uint2 y = *reinterpret_cast<const uint2*>(b + w);
      if constexpr (Elem::kWords == 2) {
        dot = fmaf(__uint_as_float(x.x), __uint_as_float(y.x), dot);
        dot = fmaf(__uint_as_float(x.y), __uint_as_float(y.y), dot);
      } else {
        float x0, x1, x2, x3, y0, y1, y2, y3;
        unpack2<Elem::kIsBf16>(x.x, x0, x1);
        unpack2<Elem::kIsBf16>(x.y, x2, x3);
        unpack2<Elem::kIsBf16>(y.x, y0, y1);
        unpack2<Elem::kIsBf16>(y.y, y2, y3);
        dot = fmaf(x0, y0, fmaf(x1, y1, fmaf(x2, y2, fmaf(x3, y3, dot))));
      }
    }
  } else {
    for (int d = lane; d < n; d += 32) {
      dot = fmaf(load_float<Elem>(a, d), load_float<Elem>(b, d), dot);
    }
  }
  return dot;
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
    dot = row_dot<Elem>(o_row, do_row, head_dim_v, lane);
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

// The order of dq_accum: the main kernel's warps store their dQ fragments whole
// (mainloop_bwd.cuh, accumulate_dq; flash_bwd_sm90.cu). A block_m x head_dim_pad tile is
// split into warps_m x (head_dim_pad / cols) warp tiles of 16 * mrep rows and `cols`
// columns (warp wm + wn * warps_m); inside one, fragment (slab r, n8 tile n), number
// r * (cols / 8) + n, is 32 lanes x 4 floats: lane 4 g + t holds rows g, g + 8 and
// columns 2 t, 2 t + 1 of its 16 x 8 block, as the mma C fragment does.
struct DqAccumLayout {
  int block_m, mrep, cols, warps_m, head_dim_pad;

  // Where float4 number `quad` of a (batch, head)'s buffer belongs: it holds (row, col),
  // (row, col + 1), (row + 8, col) and (row + 8, col + 1).
  CUFLASH_DEVICE void position(i64 quad, int& row, int& col) const {
    const int per_tile = block_m * head_dim_pad / 4;
    const int tile = int(quad / per_tile), q = int(quad - i64(tile) * per_tile);
    const int frag = q >> 5, lane = q & 31;
    const int n = frag % (cols / 8), wr = frag / (cols / 8);
    const int r = wr % mrep, warp = wr / mrep;
    const int wm = warp % warps_m, wn = warp / warps_m;
    row = tile * block_m + wm * 16 * mrep + r * 16 + (lane >> 2);
    col = wn * cols + n * 8 + (lane & 3) * 2;
  }
};

// dQ's elements two at a time: (col, col + 1) of a row, 4- or 8-byte aligned stores
// where the address allows (a strided dQ may not), a single element at an odd last column.
template <class Elem>
CUFLASH_DEVICE void store_pair(u16* row, int col, int head_dim, float a, float b) {
  u16* at = row + col * Elem::kWords;
  if (col + 1 >= head_dim) {
    store_float<Elem>(row, col, a);
  } else if (Elem::kWords == 2 && (reinterpret_cast<size_t>(at) & 7u) == 0) {
    *reinterpret_cast<float2*>(at) = make_float2(a, b);
  } else if (Elem::kWords == 1 && (reinterpret_cast<size_t>(at) & 3u) == 0) {
    *reinterpret_cast<u32*>(at) = pack2<Elem::kIsBf16>(a, b);
  } else {
    store_float<Elem>(row, col, a);
    store_float<Elem>(row, col + 1, b);
  }
}

// One thread per float4 of dq_accum, which is one lane's share of a 16 x 8 fragment
// (DqAccumLayout::position): the reads are whole 512-byte lines a warp, in the buffer's
// own order; each lane writes two pairs of adjacent columns.
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
  const i64 quad = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  int row, col;
  layout.position(quad, row, col);
  if (row >= seq.seqlen_q || col >= head_dim) return;
  const int head = blockIdx.y;
  const i64 stats_row = seq.stats_start(int(batch), gridDim.y, seqlen_q_pad) +
                        i64(head) * seqlen_q_pad;
  const float4 x =
      __ldg(reinterpret_cast<const float4*>(dq_accum + stats_row * head_dim_pad) + quad);
  u16* out = dq + batch * dq_batch_stride + head * dq_head_stride +
             (seq.q_start + row) * dq_row_stride;
  store_pair<Elem>(out, col, head_dim, x.x * scale, x.y * scale);
  if (row + 8 < seq.seqlen_q) {
    store_pair<Elem>(out + 8 * dq_row_stride, col, head_dim, x.z * scale, x.w * scale);
  }
}

}  // namespace cuflash
