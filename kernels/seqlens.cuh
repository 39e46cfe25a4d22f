// cuflash: where one batch element's sequence lives.
//
// Fixed-length batches: every sequence has the kernel's seqlen_q / seqlen_k rows, and
// batch b starts at b * batch_stride. Packed variable-length batches
// (cuflash.attention_varlen): cu_seqlens_q / cu_seqlens_k hold the prefix sums of the
// lengths, the batch strides are 0, and sequence b is the rows cu_seqlens[b] ..
// cu_seqlens[b+1] - 1; the kernel's seqlen arguments are then the maxima (the grid's size).
#pragma once
#include "common.cuh"

namespace cuflash {

// The backward's row statistics (lse in log2 units, delta, the float32 dQ buffer) are
// padded per sequence to whole tiles of this many rows (cuflash/_kernels.py BWD_ROW_PAD).
constexpr int kStatsRowPad = 128;

struct SeqLens {
  int seqlen_q, seqlen_k;  // of this sequence
  int q_start, k_start;    // its first row of the packed q (out, lse) and k (v); 0 if fixed
  bool packed;

  static CUFLASH_DEVICE SeqLens get(const int* cu_seqlens_q, const int* cu_seqlens_k, int batch,
                                    int seqlen_q, int seqlen_k) {
    if (!cu_seqlens_q) return {seqlen_q, seqlen_k, 0, 0, false};
    const int q0 = cu_seqlens_q[batch], k0 = cu_seqlens_k[batch];
    return {cu_seqlens_q[batch + 1] - q0, cu_seqlens_k[batch + 1] - k0, q0, k0, true};
  }

  // Row of this sequence's (batch, head) statistics, head 0, row 0; heads are
  // seqlen_q_pad rows apart. Fixed: (batch, head, row) of a (B, H, seqlen_q_pad) array.
  // Packed: (head, row) of an (H, seqlen_q_pad) array, sequence b starting at the
  // kStatsRowPad-aligned row at or below q_start + kStatsRowPad * b, which leaves room
  // for each sequence's padded last tile before the next one starts.
  CUFLASH_DEVICE i64 stats_start(int batch, int num_heads, int seqlen_q_pad) const {
    if (!packed) return i64(batch) * num_heads * seqlen_q_pad;
    return i64((q_start + kStatsRowPad * batch) / kStatsRowPad) * kStatsRowPad;
  }
};

}  // namespace cuflash
