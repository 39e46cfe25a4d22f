// cuflash: fused attention forward for Hopper (sm_90a): the copy engine (TMA) loads the
// tiles, warpgroup matrix products (wgmma) compute on them, and warps specialise.
//
// One thread block owns kBlockM = 64 * kConsumers query rows of one (batch, head):
//   warpgroup 0 (producer): one thread issues the TMA loads -- Q once, then K_j and V_j
//     into a ring of kStages buffers, each guarded by a full and an empty mbarrier;
//     the warpgroup gives most of its registers to the consumers (setmaxnreg)
//   warpgroups 1..kConsumers (consumers): 64 query rows each; per key tile, from the
//     last to the first:
//       S = Q K_j^T         wgmma, both operands in shared memory        sm90/wgmma.cuh
//       kOptions: softcap, ALiBi                                          scores.cuh
//       mask (ragged end, causal diagonal, window edges)                  mask.cuh
//       online softmax: m_i, l_i, rescale of o_acc, P = exp2(...)         softmax.cuh
//       kDropout: dropout of P, after the row sums                        dropout.cuh
//       O += P V_j          wgmma, P from registers, V in shared memory
//     then o_acc / l_i and lse are written from registers.
// The score matrix never reaches global memory. The host encodes the tensor maps and
// picks the template arguments (cuflash/_sm90.py).
// Packed sequences (cu_seqlens_q/k not null, seqlens.cuh): the tensor maps span the packed
// rows, and a tile that runs past its sequence reads the next one's rows, which the mask
// hides (weight exactly 0: they must be finite, as every row of a packed batch is).
#include "common.cuh"
#include "dropout.cuh"
#include "mask.cuh"
#include "scores.cuh"
#include "seqlens.cuh"
#include "softmax.cuh"
#include "warp_gemm.cuh"
#include "sm90/tma.cuh"
#include "sm90/wgmma.cuh"

namespace cuflash {
namespace sm90 {

template <class Elem, int kHeadDim_, int kBlockN_, int kConsumers_, int kStages_,
          bool kOverlap_, bool kPingpong_>
struct FwdTraits {
  static constexpr bool kIsBf16 = Elem::kIsBf16;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kStages = kStages_;
  // kOverlap: S_{j+1} = Q K^T is computed while the softmax of tile j runs (its P V product
  // too), within each consumer warpgroup; kPingpong: the two consumer warpgroups take
  // turns issuing their products, so one's softmax overlaps the other's products.
  static constexpr bool kOverlap = kOverlap_;
  static constexpr bool kPingpong = kPingpong_ && kConsumers_ == 2;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kNTiles = kBlockN / 8;    // n8 column tiles of S
  static constexpr int kDTiles = kHeadDim / 8;   // n8 column tiles of O
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column (128-byte) blocks of a row
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;  // one K or V tile
  static constexpr int kBarrierBytes = 8 * (1 + 4 * kStages);  // Q full, 4 a stage
  // +1024: the dynamic shared memory is aligned to 1024 bytes by hand
  static constexpr int kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
  // registers a thread: the producer warpgroup gives its registers to the consumers
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static_assert(regs_split_fits(kConsumers, kConsumerRegs, kProducerRegs),
                "setmaxnreg: the consumers take more registers than the producer frees");

  static_assert(kHeadDim % 64 == 0, "head dims in whole 128-byte column blocks");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "key tiles of 16..256 keys");
  static_assert(Elem::kWords == 1, "16-bit inputs only");
};

// Shared memory: [Q][K_0 .. K_{s-1}][V_0 .. V_{s-1}][barriers], 1024-byte aligned.
template <class T>
struct FwdSmem {
  u32 base;
  CUFLASH_DEVICE u32 q() const { return base; }
  CUFLASH_DEVICE u32 k(int st) const { return base + T::kQBytes + st * T::kKVBytes; }
  CUFLASH_DEVICE u32 v(int st) const { return base + T::kQBytes + (T::kStages + st) * T::kKVBytes; }
  CUFLASH_DEVICE u32 bar(int i) const {
    return base + T::kQBytes + 2 * T::kStages * T::kKVBytes + 8 * i;
  }
  // barriers: Q full; then per stage K full, K empty, V full, V empty
  CUFLASH_DEVICE u32 q_full() const { return bar(0); }
  CUFLASH_DEVICE u32 k_full(int st) const { return bar(1 + 4 * st); }
  CUFLASH_DEVICE u32 k_empty(int st) const { return bar(2 + 4 * st); }
  CUFLASH_DEVICE u32 v_full(int st) const { return bar(3 + 4 * st); }
  CUFLASH_DEVICE u32 v_empty(int st) const { return bar(4 + 4 * st); }
};

// One consumer warpgroup's work on its 64 query rows: the products and the softmax steps
// of the key loop, named after the algorithm.
template <class T, bool kCausal, bool kOptions, bool kDropout>
struct FwdConsumer {
  FwdSmem<T> sm;
  Mask<kCausal, kOptions> mask;
  ScoreMod<kOptions> scores;  // kOptions: softcap, ALiBi
  Dropout<kDropout> dropout;
  float scale_log2;
  // kOptions: what the softmax's scores are in, relative to log2 units (units()).
  float units_;
  u32 q_rows;     // this warpgroup's 64 rows of the Q tile
  int m0, warp_row0, wg, lane;

  float o_acc[1][T::kDTiles][4];
  OnlineSoftmax<1> softmax;

  // Turns between the two consumer warpgroups (kPingpong): named barriers 1 and 2.
  CUFLASH_DEVICE void wait_turn() const {
    if constexpr (T::kPingpong) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg) : "memory");
  }
  CUFLASH_DEVICE void pass_turn() const {
    if constexpr (T::kPingpong) asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - wg) : "memory");
  }

  // S = Q K^T on stage st (issued, not awaited): kHeadDim / 16 products of k16, both
  // operands K-major.
  CUFLASH_DEVICE void issue_qk(float (&s)[1][T::kNTiles][4], int st) const {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < T::kHeadDim / 16; ++kk) {
      const u32 col = (kk % 4) * 32;  // bytes into the 128-byte column block
      const u64 da = smem_desc(q_rows + (kk / 4) * T::kBlockM * 128 + col, 16);
      const u64 db = smem_desc(sm.k(st) + (kk / 4) * T::kBlockN * 128 + col, 16);
      wgmma_ss<T::kBlockN, T::kIsBf16>(s[0], da, db, kk > 0);
    }
    wgmma_commit();
  }

  // O += P V on stage st (issued, not awaited): P from registers, V MN-major (its rows
  // are the k dimension).
  CUFLASH_DEVICE void issue_pv(const u32 (&p)[1][T::kBlockN / 16][4], int st) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < T::kBlockN / 16; ++kk) {
      const u64 db = smem_desc(sm.v(st) + kk * 16 * 128, T::kBlockN * 128);
      wgmma_rs<T::kHeadDim, T::kIsBf16>(o_acc[0], p[0][kk], db, true);
    }
    wgmma_commit();
  }

  // One arrival per warp on a stage's empty barrier: the producer may refill it.
  CUFLASH_DEVICE void release(u32 empty_bar) const {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty_bar);
  }

  // The scores of key tile n: score transform, mask, then the softmax's first half (alpha
  // for o_acc), and dropout of P (after the row sums: l_i normalises over every key).
  CUFLASH_DEVICE void softmax_scores(float (&s)[1][T::kNTiles][4], int n, float (&alpha)[1][2]) {
    if constexpr (kOptions) {
      scores.apply_unswitched(s, warp_row0, n * T::kBlockN, lane);
    }
    if (mask.template tile_needs_mask<T::kBlockN, T::kBlockM>(n, m0)) {
      mask.apply(s, warp_row0, n * T::kBlockN, lane);
    }
    softmax.template update_scores<true>(s, alpha, units());
    if constexpr (kDropout) {
      if (dropout.active()) dropout.template apply<false>(s, warp_row0, n * T::kBlockN, lane);
    }
  }

  // The raw dot products (units scale * log2(e)) unless a softcap or ALiBi transforms
  // them (ScoreMod::units).
  CUFLASH_DEVICE float units() const { return kOptions ? units_ : scale_log2; }

  CUFLASH_DEVICE static void pack_p(u32 (&p)[1][T::kBlockN / 16][4],
                                    const float (&s)[1][T::kNTiles][4]) {
    pack_frags<T::kIsBf16 ? kPrecBF16 : kPrecF16, 1, T::kBlockN>(p, s);
  }

  // Tiles n_block_max - 1 down to n_block_max - n_iters, one after the other: S, softmax,
  // P V.
  CUFLASH_DEVICE void run_sequential(int n_block_max, int n_iters) {
    for (int it = 0; it < n_iters; ++it) {
      const int n = n_block_max - 1 - it, st = it % T::kStages;
      const u32 parity = (it / T::kStages) & 1;
      float s[1][T::kNTiles][4];
      u32 p[1][T::kBlockN / 16][4];
      float alpha[1][2];
      mbar_wait(sm.k_full(st), parity);
      wait_turn();
      issue_qk(s, st);
      wgmma_wait<0>();
      pass_turn();
      fence_regs(s[0]);
      release(sm.k_empty(st));
      softmax_scores(s, n, alpha);
      softmax.rescale(o_acc, alpha);
      pack_p(p, s);
      mbar_wait(sm.v_full(st), parity);
      issue_pv(p, st);
      wgmma_wait<0>();
      fence_regs(o_acc[0]);
      release(sm.v_empty(st));
    }
  }

  // kOverlap: S_{j+1} and P_j V_j are issued together; the softmax of S_{j+1} runs while
  // P_j V_j is still in flight, and o_acc is rescaled once it has landed.
  CUFLASH_DEVICE void run_overlapped(int n_block_max, int n_iters) {
    float s[1][T::kNTiles][4];
    u32 p[1][T::kBlockN / 16][4];
    float alpha[1][2];
    mbar_wait(sm.k_full(0), 0);
    wait_turn();
    issue_qk(s, 0);
    pass_turn();
    wgmma_wait<0>();
    fence_regs(s[0]);
    release(sm.k_empty(0));
    softmax_scores(s, n_block_max - 1, alpha);  // (o_acc is 0: no rescale)
    pack_p(p, s);
    for (int it = 1; it < n_iters; ++it) {
      const int n = n_block_max - 1 - it, st = it % T::kStages, prev = (it - 1) % T::kStages;
      const u32 parity = (it / T::kStages) & 1, prev_parity = ((it - 1) / T::kStages) & 1;
      mbar_wait(sm.k_full(st), parity);
      mbar_wait(sm.v_full(prev), prev_parity);
      wait_turn();
      issue_qk(s, st);
      issue_pv(p, prev);
      pass_turn();
      wgmma_wait<1>();  // S_{j+1} has landed; P_j V_j may still run
      fence_regs(s[0]);
      release(sm.k_empty(st));
      softmax_scores(s, n, alpha);
      wgmma_wait<0>();
      fence_regs(o_acc[0]);
      fence_regs(p[0]);
      release(sm.v_empty(prev));
      softmax.rescale(o_acc, alpha);
      pack_p(p, s);
    }
    const int last = (n_iters - 1) % T::kStages;
    mbar_wait(sm.v_full(last), ((n_iters - 1) / T::kStages) & 1);
    wait_turn();
    issue_pv(p, last);
    pass_turn();
    wgmma_wait<0>();
    fence_regs(o_acc[0]);
    release(sm.v_empty(last));
  }
};

// kOptions: window, softcap and ALiBi (run-time values; a window runs with kCausal off,
// its right edge bounding the keys); kDropout (with kOptions): dropout of P.
template <class Elem, int kHeadDim, int kBlockN, int kConsumers, int kStages, bool kOverlap,
          bool kPingpong, bool kCausal, bool kOptions, bool kDropout>
__global__ void __launch_bounds__(128 * (kConsumers + 1), 1)
    flash_fwd_sm90_kernel(const __grid_constant__ TensorMap tm_q,
                          const __grid_constant__ TensorMap tm_k,
                          const __grid_constant__ TensorMap tm_v, u16* __restrict__ o,
                          float* __restrict__ lse, i64 o_batch_stride, i64 o_head_stride,
                          i64 o_row_stride, i64 lse_batch_stride, i64 lse_head_stride,
                          int seqlen_q, int seqlen_k, int head_dim, int heads_per_kv,
                          float scale_log2, int window_left, int window_right,
                          float softcap_in, float softcap_out,
                          const float* __restrict__ alibi_slopes, i64 alibi_batch_stride,
                          u32 dropout_threshold, float dropout_scale, u64 dropout_seed,
                          u32 dropout_bh0, const int* __restrict__ cu_seqlens_q,
                          const int* __restrict__ cu_seqlens_k) {
  static_assert(!kDropout || kOptions, "the dropout kernels are options kernels");
  using T = FwdTraits<Elem, kHeadDim, kBlockN, kConsumers, kStages, kOverlap, kPingpong>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const FwdSmem<T> sm{(smem_addr(smem_raw) + 1023u) & ~1023u};
  check_dynamic_smem(T::kSmemBytes);  // the host's launch (Sm90FwdSpec.smem_bytes) agrees

  // Causal blocks are launched heaviest (last query rows) first.
  const int m_block = kCausal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int m0 = m_block * T::kBlockM;
  const SeqLens seq = SeqLens::get(cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k);
  if (m0 >= seq.seqlen_q) return;  // packed: a shorter sequence than the grid's
  seqlen_q = seq.seqlen_q;
  seqlen_k = seq.seqlen_k;
  const int tm_batch = seq.packed ? 0 : batch;  // the tensor maps' batch coordinate
  const Mask<kCausal, kOptions> mask{seqlen_q, seqlen_k, window_left, window_right};
  const int n_block_max = mask.template n_block_max<kBlockN>(m0, T::kBlockM);
  // key tiles n_block_max - 1 down to n_block_max - n_iters (a window's left edge)
  const int n_iters =
      kOptions ? max(n_block_max - mask.template n_block_min<kBlockN>(m0), 0) : n_block_max;
  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(sm.q_full(), 1);
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(sm.k_full(st), 1);
      mbar_init(sm.v_full(st), 1);
      mbar_init(sm.k_empty(st), 4 * kConsumers);  // one arrival per consumer warp
      mbar_init(sm.v_empty(st), 4 * kConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer: tile loads ----
    regs_dealloc<T::kProducerRegs>();
    if (threadIdx.x == 0) {
      prefetch_tensor_map(tm_q);
      prefetch_tensor_map(tm_k);
      prefetch_tensor_map(tm_v);
      const int kv_head = head / heads_per_kv;
      if (n_iters > 0) {
        mbar_expect_tx(sm.q_full(), T::kQBytes);
        load_rows<T::kColBlocks>(sm.q(), tm_q, sm.q_full(), T::kBlockM, seq.q_start + m0, head,
                                 tm_batch);
      }
      for (int it = 0; it < n_iters; ++it) {
        const int n = n_block_max - 1 - it, st = it % kStages;
        const u32 parity = ((it / kStages) & 1) ^ 1;
        mbar_wait(sm.k_empty(st), parity);
        mbar_expect_tx(sm.k_full(st), T::kKVBytes);
        load_rows<T::kColBlocks>(sm.k(st), tm_k, sm.k_full(st), kBlockN,
                                 seq.k_start + n * kBlockN, kv_head, tm_batch);
        mbar_wait(sm.v_empty(st), parity);
        mbar_expect_tx(sm.v_full(st), T::kKVBytes);
        load_rows<T::kColBlocks>(sm.v(st), tm_v, sm.v_full(st), kBlockN,
                                 seq.k_start + n * kBlockN, kv_head, tm_batch);
      }
    }
    return;
  }

  // ---- consumers: 64 query rows a warpgroup ----
  regs_alloc<T::kConsumerRegs>();
  const int tid = threadIdx.x - 128 * warpgroup;  // within the warpgroup
  FwdConsumer<T, kCausal, kOptions, kDropout> c;
  c.sm = sm;
  c.mask = mask;
  c.scale_log2 = scale_log2;
  if constexpr (kOptions) {
    const float slope = alibi_slopes ? alibi_slopes[batch * alibi_batch_stride + head] : 0.f;
    c.scores = ScoreMod<kOptions>::make(scale_log2, softcap_in, softcap_out, slope,
                                        seqlen_k - seqlen_q);
    c.units_ = c.scores.units_or(scale_log2);
  }
  c.dropout = Dropout<kDropout>::make(dropout_threshold, dropout_seed,
                                      dropout_bh0 + u32(batch) * gridDim.y + head);
  c.wg = warpgroup - 1;
  c.lane = tid & 31;
  c.m0 = m0;
  c.warp_row0 = m0 + c.wg * 64 + (tid >> 5) * 16;  // this warp's 16 rows
  c.q_rows = sm.q() + c.wg * 64 * 128;
#pragma unroll
  for (int d = 0; d < T::kDTiles; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) c.o_acc[0][d][e] = 0.f;
  c.softmax.init();

  // kPingpong: warpgroup 0 goes first; warpgroup 1's extra turn is taken back at the end
  if (T::kPingpong && c.wg == 1) c.pass_turn();
  if (n_iters > 0) {
    mbar_wait(sm.q_full(), 0);
    if constexpr (kOverlap) {
      c.run_overlapped(n_block_max, n_iters);
    } else {
      c.run_sequential(n_block_max, n_iters);
    }
  }
  if (T::kPingpong && c.wg == 0) c.wait_turn();

  // ---- epilogue: o_acc / l_i and lse, straight from registers ----
  const int lane = c.lane;
  float lse_rows[1][2];
  c.softmax.finalize(c.o_acc, lse_rows, c.units(),
                     kDropout && c.dropout.active() ? dropout_scale : 1.f);
  // (the sequence's first row is read again here rather than held across the loop)
  const int row0 = SeqLens::get(cu_seqlens_q, cu_seqlens_k, batch, 0, 0).q_start;
  u16* o_tile = o + i64(tm_batch) * o_batch_stride + i64(head) * o_head_stride +
                i64(row0) * o_row_stride;
  float* lse_tile = lse + i64(tm_batch) * lse_batch_stride + i64(head) * lse_head_stride + row0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = c.warp_row0 + (lane >> 2) + 8 * h;
    if (row >= seqlen_q) continue;
    u16* o_row = o_tile + i64(row) * o_row_stride;
#pragma unroll
    for (int d = 0; d < T::kDTiles; ++d) {
      const int col = d * 8 + (lane & 3) * 2;
      if (col < head_dim) {  // head dims are even here (16-byte rows for the copy engine)
        const u32 pair = pack2<T::kIsBf16>(c.o_acc[0][d][2 * h], c.o_acc[0][d][2 * h + 1]);
        *reinterpret_cast<u32*>(o_row + col) = pair;
      }
    }
    if ((lane & 3) == 0) lse_tile[row] = lse_rows[0][h];
  }
}

}  // namespace sm90
}  // namespace cuflash
