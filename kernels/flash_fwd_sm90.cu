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
// kPersistent (at every length since perf-log h22; one tile a block is the fallback): one
// block a multiprocessor walks tiles (TileOrder, FwdTile), each the next one not yet taken
// from a counter, which its producer takes once it has issued its current tile's last
// loads. Q of the next tile loads as soon as the consumers' last S product of the current
// one has landed (Q empty), and the K/V ring runs on across tiles, so a tile's loads
// overlap its predecessor's last products and epilogue.
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
          bool kOverlap_, bool kPingpong_, bool kPersistent_>
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
  static constexpr bool kPersistent = kPersistent_;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kNTiles = kBlockN / 8;    // n8 column tiles of S
  static constexpr int kDTiles = kHeadDim / 8;   // n8 column tiles of O
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column (128-byte) blocks of a row
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;  // one K or V tile
  // kPersistent at d64: two Q buffers, so that the next tile's Q loads while this tile
  // runs (+2-9% at L <= 4k; at d128 1-2% slower, perf-log h23; above, no room)
  static constexpr int kQBuffers = kPersistent && kHeadDim <= 64 ? 2 : 1;
  // Q full, 4 a stage; kPersistent: Q empty and two 4-byte tile slots, and Q full and Q
  // empty of a second Q buffer
  static constexpr int kBarrierBytes = 8 * (1 + 4 * kStages) + (kPersistent ? 16 * kQBuffers : 0);
  // +1024: the dynamic shared memory is aligned to 1024 bytes by hand
  static constexpr int kSmemBytes =
      1024 + kQBuffers * kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
  // registers a thread: the producer warpgroup gives its registers to the consumers
  // (the persistent producer walks its tiles in more registers: 56 beside three consumers)
  static constexpr int kProducerRegs = kPersistent && kConsumers == 3 ? 56 : 24;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : kPersistent ? 152 : 160;
  static_assert(regs_split_fits(kConsumers, kConsumerRegs, kProducerRegs),
                "setmaxnreg: the consumers take more registers than the producer frees");

  static_assert(kHeadDim % 64 == 0, "head dims in whole 128-byte column blocks");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "key tiles of 16..256 keys");
  static_assert(Elem::kWords == 1, "16-bit inputs only");
};

// Shared memory: [Q_0 (, Q_1)][K_0 .. K_{s-1}][V_0 .. V_{s-1}][barriers], 1024-byte
// aligned.
template <class T>
struct FwdSmem {
  u32 base;
  static constexpr int kQEnd = T::kQBuffers * T::kQBytes;
  CUFLASH_DEVICE u32 q(int b = 0) const { return base + b * T::kQBytes; }
  CUFLASH_DEVICE u32 k(int st) const { return base + kQEnd + st * T::kKVBytes; }
  CUFLASH_DEVICE u32 v(int st) const { return base + kQEnd + (T::kStages + st) * T::kKVBytes; }
  CUFLASH_DEVICE u32 bar(int i) const { return base + kQEnd + 2 * T::kStages * T::kKVBytes + 8 * i; }
  // barriers: Q full; then per stage K full, K empty, V full, V empty
  CUFLASH_DEVICE u32 q_full(int b = 0) const { return b == 0 ? bar(0) : bar(3 + 4 * T::kStages); }
  CUFLASH_DEVICE u32 k_full(int st) const { return bar(1 + 4 * st); }
  CUFLASH_DEVICE u32 k_empty(int st) const { return bar(2 + 4 * st); }
  CUFLASH_DEVICE u32 v_full(int st) const { return bar(3 + 4 * st); }
  CUFLASH_DEVICE u32 v_empty(int st) const { return bar(4 + 4 * st); }
  // kPersistent: Q empty, and the index of a block's c-th tile, written by the producer
  // before Q full's arrival; then Q full and Q empty of the second Q buffer. A block's
  // c-th tile takes Q buffer c % kQBuffers, in that buffer's phase c / kQBuffers.
  CUFLASH_DEVICE u32 q_empty(int b = 0) const {
    return b == 0 ? bar(1 + 4 * T::kStages) : bar(4 + 4 * T::kStages);
  }
  static CUFLASH_DEVICE int q_buffer(int c) { return c % T::kQBuffers; }
  static CUFLASH_DEVICE u32 q_phase(int c) { return u32(c / T::kQBuffers) & 1u; }
  CUFLASH_DEVICE u32 tile_slot(int c) const { return bar(2 + 4 * T::kStages) + 4 * (c & 1); }
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
  int q_buf = 0;  // kPersistent: the tile's Q buffer
  int m0, warp_row0, wg, lane;

  float o_acc[1][T::kDTiles][4];
  OnlineSoftmax<1> softmax;

  // The start of a tile: bind gives the warpgroup its shared memory, mask and place;
  // start_tile the tile's query rows m0 .., its score transform (kOptions; slope: the
  // head's ALiBi slope, offset: seqlen_k - seqlen_q) and dropout, o_acc = 0 and the
  // softmax's running statistics. (offset is mask.offset(), passed in from the caller's
  // own sequence lengths: read back from the mask, it rescheduled the persistent options
  // kernels, whose machine code is the one measured.)
  CUFLASH_DEVICE void bind(const FwdSmem<T>& sm_, const Mask<kCausal, kOptions>& mask_,
                           float scale_log2_, int warpgroup, int tid) {
    sm = sm_;
    mask = mask_;
    scale_log2 = scale_log2_;
    wg = warpgroup - 1;
    lane = tid & 31;
  }
  CUFLASH_DEVICE void start_tile(float softcap_in, float softcap_out, float slope, int offset,
                                 const Dropout<kDropout>& dropout_, int m0_, int tid) {
    if constexpr (kOptions) {
      scores = ScoreMod<kOptions>::make(scale_log2, softcap_in, softcap_out, slope, offset);
      units_ = scores.units_or(scale_log2);
    }
    dropout = dropout_;
    m0 = m0_;
    warp_row0 = m0 + wg * 64 + (tid >> 5) * 16;  // this warp's 16 rows
    q_rows = sm.q(q_buf) + wg * 64 * 128;
#pragma unroll
    for (int d = 0; d < T::kDTiles; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[0][d][e] = 0.f;
    softmax.init();
  }

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
    // (persistent d192, d256: Q's address through an opaque move, else the compiler hoists
    // its descriptors out of the tile loop, and the options kernels then spill them)
    u32 q_base = q_rows;
    if constexpr (T::kPersistent && T::kHeadDim >= 192) {
      asm volatile("mov.b32 %0, %0;\n" : "+r"(q_base));
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < T::kHeadDim / 16; ++kk) {
      const u32 col = (kk % 4) * 32;  // bytes into the 128-byte column block
      const u64 da = smem_desc(q_base + (kk / 4) * T::kBlockM * 128 + col, 16);
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

  // The K/V ring runs on across a persistent block's tiles: its load number r (ring, the
  // loads of the block's earlier tiles, plus it) sits in stage r % kStages, in phase
  // r / kStages. (One tile a block: ring 0.)
  CUFLASH_DEVICE static int stage(int r) { return r % T::kStages; }
  CUFLASH_DEVICE static u32 phase(int r) { return (r / T::kStages) & 1; }

  // kPersistent: the producer may load the next tile's Q (this one's S products are done)
  // and write the next tile slot. (Every thread arrives, having read this tile's slot:
  // compute-sanitizer's racecheck then sees each read ordered before the slot's reuse.)
  CUFLASH_DEVICE void release_q() const {
    if constexpr (T::kPersistent) mbar_arrive(sm.q_empty(q_buf));
  }

  // Tiles n_block_max - 1 down to n_block_max - n_iters, one after the other: S, softmax,
  // P V.
  CUFLASH_DEVICE void run_sequential(int n_block_max, int n_iters, int ring) {
    for (int it = 0; it < n_iters; ++it) {
      const int n = n_block_max - 1 - it, st = stage(ring + it);
      const u32 parity = phase(ring + it);
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
    release_q();
  }

  // kOverlap: S_{j+1} and P_j V_j are issued together; the softmax of S_{j+1} runs while
  // P_j V_j is still in flight, and o_acc is rescaled once it has landed.
  CUFLASH_DEVICE void run_overlapped(int n_block_max, int n_iters, int ring) {
    float s[1][T::kNTiles][4];
    u32 p[1][T::kBlockN / 16][4];
    float alpha[1][2];
    mbar_wait(sm.k_full(stage(ring)), phase(ring));
    wait_turn();
    issue_qk(s, stage(ring));
    pass_turn();
    wgmma_wait<0>();
    fence_regs(s[0]);
    release(sm.k_empty(stage(ring)));
    softmax_scores(s, n_block_max - 1, alpha);  // (o_acc is 0: no rescale)
    pack_p(p, s);
    for (int it = 1; it < n_iters; ++it) {
      const int n = n_block_max - 1 - it, st = stage(ring + it), prev = stage(ring + it - 1);
      const u32 parity = phase(ring + it), prev_parity = phase(ring + it - 1);
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
      // The wait for P_j V_j sits in both arms of a branch on the softmax's result (no row
      // of the warp raised its max: no rescale), so that ptxas cannot hoist it above the
      // exponentials, which then run beside the product (perf-log h16, h20).
      if (__all_sync(~0u, alpha[0][0] == 1.f && alpha[0][1] == 1.f)) {
        wgmma_wait<0>();
        fence_regs(o_acc[0]);
      } else {
        wgmma_wait<0>();
        fence_regs(o_acc[0]);
        softmax.rescale(o_acc, alpha);
      }
      fence_regs(p[0]);
      release(sm.v_empty(prev));
      pack_p(p, s);
    }
    release_q();  // (the last S product has landed)
    const int last = stage(ring + n_iters - 1);
    mbar_wait(sm.v_full(last), phase(ring + n_iters - 1));
    wait_turn();
    issue_pv(p, last);
    pass_turn();
    wgmma_wait<0>();
    fence_regs(o_acc[0]);
    release(sm.v_empty(last));
  }

  // Epilogue: o_acc / l_i and lse, straight from registers, to the rows of (batch, head)
  // (tm_batch: its batch index in o and lse, 0 for packed sequences).
  CUFLASH_DEVICE void store_output(u16* o, float* lse, i64 o_batch_stride, i64 o_head_stride,
                                   i64 o_row_stride, i64 lse_batch_stride, i64 lse_head_stride,
                                   int tm_batch, int head, int batch, const int* cu_seqlens_q,
                                   const int* cu_seqlens_k, int seqlen_q, int head_dim,
                                   float dropout_scale) {
    float lse_rows[1][2];
    softmax.finalize(o_acc, lse_rows, units(), dropout_scale);
    // (the sequence's first row is read again here rather than held across the loop)
    const int row0 = SeqLens::get(cu_seqlens_q, cu_seqlens_k, batch, 0, 0).q_start;
    u16* o_tile = o + i64(tm_batch) * o_batch_stride + i64(head) * o_head_stride +
                  i64(row0) * o_row_stride;
    float* lse_tile =
        lse + i64(tm_batch) * lse_batch_stride + i64(head) * lse_head_stride + row0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + (lane >> 2) + 8 * h;
      if (row >= seqlen_q) continue;
      u16* o_row = o_tile + i64(row) * o_row_stride;
#pragma unroll
      for (int d = 0; d < T::kDTiles; ++d) {
        const int col = d * 8 + (lane & 3) * 2;
        if (col < head_dim) {  // head dims are even here (16-byte rows for the copy engine)
          const u32 pair = pack2<T::kIsBf16>(o_acc[0][d][2 * h], o_acc[0][d][2 * h + 1]);
          *reinterpret_cast<u32*>(o_row + col) = pair;
        }
      }
      if ((lane & 3) == 0) lse_tile[row] = lse_rows[0][h];
    }
  }
};

// kPersistent: the order of a launch's tiles, that of the one-tile blocks' grid: all the m
// blocks of a (batch, head) pair (causal: counted from the last, so that the longest tiles
// go first), then the next pair. (Pairs interleaved in groups, for the L2 cache, were no
// faster: perf-log h18.)
struct TileOrder {
  int m_blocks, num_heads, num_tiles;

  // tile index -> m block (before the causal reversal) and (batch, head) pair
  CUFLASH_DEVICE void decode(int index, int& m_index, int& pair) const {
    pair = index / m_blocks;
    m_index = index - pair * m_blocks;
  }
};

// kPersistent: a tile, query rows m0 .. m0 + kBlockM - 1 of one (batch, head).
// n_iters: the key tiles to walk (n_block_max - 1 down), or -1 past a packed sequence's
// end (no rows: nothing to load or write).
template <bool kCausal, bool kOptions, int kBlockM, int kBlockN>
struct FwdTile {
  int m0, head, batch, n_block_max, n_iters;
  SeqLens seq;
  Mask<kCausal, kOptions> mask;

  static CUFLASH_DEVICE FwdTile at(int index, const TileOrder& order, int seqlen_q,
                                   int seqlen_k, int window_left, int window_right,
                                   const int* cu_seqlens_q, const int* cu_seqlens_k) {
    FwdTile t;
    int m_index, pair;
    order.decode(index, m_index, pair);
    t.head = pair % order.num_heads;
    t.batch = pair / order.num_heads;
    t.m0 = (kCausal ? order.m_blocks - 1 - m_index : m_index) * kBlockM;
    t.seq = SeqLens::get(cu_seqlens_q, cu_seqlens_k, t.batch, seqlen_q, seqlen_k);
    t.mask = Mask<kCausal, kOptions>{t.seq.seqlen_q, t.seq.seqlen_k, window_left, window_right};
    t.n_block_max = 0;
    t.n_iters = -1;
    if (t.m0 >= t.seq.seqlen_q) return t;  // packed: a shorter sequence than the longest
    // key tiles n_block_max - 1 down to n_block_max - n_iters (a window's left edge)
    t.n_block_max = t.mask.template n_block_max<kBlockN>(t.m0, kBlockM);
    t.n_iters = kOptions ? max(t.n_block_max - t.mask.template n_block_min<kBlockN>(t.m0), 0)
                         : t.n_block_max;
    return t;
  }
};

// The kernel's body with persistent blocks (kPersistent; its arguments are the kernel's).
template <class T, bool kCausal, bool kOptions, bool kDropout>
CUFLASH_DEVICE void flash_fwd_sm90_persistent(
    const FwdSmem<T>& sm, const TensorMap& tm_q, const TensorMap& tm_k, const TensorMap& tm_v,
    u16* __restrict__ o, float* __restrict__ lse, i64 o_batch_stride, i64 o_head_stride,
    i64 o_row_stride, i64 lse_batch_stride, i64 lse_head_stride, int seqlen_q, int seqlen_k,
    int head_dim, int heads_per_kv, float scale_log2, int window_left, int window_right,
    float softcap_in, float softcap_out, const float* __restrict__ alibi_slopes,
    i64 alibi_batch_stride, u32 dropout_threshold, float dropout_scale, u64 dropout_seed,
    u32 dropout_bh0, const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
    const TileOrder order, int* __restrict__ tile_sched) {
  using Tile = FwdTile<kCausal, kOptions, T::kBlockM, T::kBlockN>;
  constexpr int kStages = T::kStages, kBlockN = T::kBlockN;
  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int b = 0; b < T::kQBuffers; ++b) {
      mbar_init(sm.q_full(b), 1);
      mbar_init(sm.q_empty(b), 128 * T::kConsumers);  // one arrival per consumer thread
    }
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(sm.k_full(st), 1);
      mbar_init(sm.v_full(st), 1);
      mbar_init(sm.k_empty(st), 4 * T::kConsumers);
      mbar_init(sm.v_empty(st), 4 * T::kConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer: tile loads, by one thread ----
    regs_dealloc<T::kProducerRegs>();
    if (threadIdx.x != 0) return;
    prefetch_tensor_map(tm_q);
    prefetch_tensor_map(tm_k);
    prefetch_tensor_map(tm_v);
    // (every tile from the counter, the first too: a block that starts late, after others
    // have run out of work, takes what is left rather than a long tile of the first wave)
    int index = atomicAdd(tile_sched, 1);
    u32 ring = 0;  // K/V loads issued so far
#pragma unroll 1
    for (int c = 0;; ++c) {
      // the consumers are past the S products of tile c - kQBuffers, the last in this Q
      // buffer (and so past its Q full and slot; with two buffers, past tile c - 2's slot
      // too, which this one's shares)
      const int qb = FwdSmem<T>::q_buffer(c);
      mbar_wait(sm.q_empty(qb), FwdSmem<T>::q_phase(c) ^ 1u);
      st_shared_b32(sm.tile_slot(c), u32(index));
      if (index >= order.num_tiles) {
        mbar_arrive(sm.q_full(qb));  // wakes the consumers to the end
        break;
      }
      // (the producer has few registers: the tile's loads as six numbers)
      int q_row, head, k_row, kv_head, tm_batch, n_iters;
      {
        const Tile t = Tile::at(index, order, seqlen_q, seqlen_k, window_left, window_right,
                                cu_seqlens_q, cu_seqlens_k);
        q_row = t.seq.q_start + t.m0;
        head = t.head;
        k_row = t.seq.k_start + (t.n_block_max - 1) * kBlockN;  // key tiles last first
        kv_head = t.head / heads_per_kv;
        tm_batch = t.seq.packed ? 0 : t.batch;  // the tensor maps' batch coordinate
        n_iters = t.n_iters;
      }
      if (n_iters > 0) {
        mbar_expect_tx(sm.q_full(qb), T::kQBytes);
        load_rows<T::kColBlocks>(sm.q(qb), tm_q, sm.q_full(qb), T::kBlockM, q_row, head,
                                 tm_batch);
      } else {
        mbar_arrive(sm.q_full(qb));  // nothing to load: the tile only goes to the consumers
      }
#pragma unroll 1
      for (; n_iters > 0; --n_iters, k_row -= kBlockN, ++ring) {
        const int st = int(ring % kStages);
        const u32 parity = ((ring / kStages) & 1) ^ 1;
        mbar_wait(sm.k_empty(st), parity);
        mbar_expect_tx(sm.k_full(st), T::kKVBytes);
        load_rows<T::kColBlocks>(sm.k(st), tm_k, sm.k_full(st), kBlockN, k_row, kv_head,
                                 tm_batch);
        mbar_wait(sm.v_empty(st), parity);
        mbar_expect_tx(sm.v_full(st), T::kKVBytes);
        load_rows<T::kColBlocks>(sm.v(st), tm_v, sm.v_full(st), kBlockN, k_row, kv_head,
                                 tm_batch);
      }
      // The next tile, taken only now that this one's loads are all issued (about kStages
      // key tiles before its consumers finish): taken early, a long tile could wait
      // behind this one while other blocks run out of work.
      index = atomicAdd(tile_sched, 1);
    }
    // the last block done resets the counters for the next launch
    __threadfence();
    if (atomicAdd(tile_sched + 1, 1) == int(gridDim.x) - 1) {
      tile_sched[0] = 0;
      tile_sched[1] = 0;
    }
    return;
  }

  // ---- consumers: 64 query rows a warpgroup ----
  regs_alloc<T::kConsumerRegs>();
  const int tid = threadIdx.x - 128 * warpgroup;  // within the warpgroup
  int ring = 0;  // K/V loads consumed so far
#pragma unroll 1
  for (int c = 0;; ++c) {
    mbar_wait(sm.q_full(FwdSmem<T>::q_buffer(c)), FwdSmem<T>::q_phase(c));
    const int index = int(ld_shared_b32(sm.tile_slot(c)));
    if (index >= order.num_tiles) break;
    const Tile t = Tile::at(index, order, seqlen_q, seqlen_k, window_left, window_right,
                            cu_seqlens_q, cu_seqlens_k);
    FwdConsumer<T, kCausal, kOptions, kDropout> w;  // this warpgroup's work on the tile
    w.bind(sm, t.mask, scale_log2, warpgroup, tid);
    w.q_buf = FwdSmem<T>::q_buffer(c);
    if (t.n_iters < 0) {  // past its sequence's end: no rows
      w.release_q();
      continue;
    }
    w.start_tile(softcap_in, softcap_out,
                 kOptions && alibi_slopes ? alibi_slopes[t.batch * alibi_batch_stride + t.head]
                                          : 0.f,
                 t.seq.seqlen_k - t.seq.seqlen_q,
                 Dropout<kDropout>::make(dropout_threshold, dropout_seed,
                                         dropout_bh0 + u32(t.batch) * order.num_heads + t.head),
                 t.m0, tid);

    // kPingpong: warpgroup 0 goes first; warpgroup 1's extra turn is taken back at the end
    if (T::kPingpong && w.wg == 1) w.pass_turn();
    if (t.n_iters > 0) {
      if constexpr (T::kOverlap) {
        w.run_overlapped(t.n_block_max, t.n_iters, ring);
      } else {
        w.run_sequential(t.n_block_max, t.n_iters, ring);
      }
      ring += t.n_iters;
    } else {
      w.release_q();
    }
    if (T::kPingpong && w.wg == 0) w.wait_turn();

    // ---- epilogue ----
    // (the tile's head and batch are found again here rather than held across the loop)
    int m_index, pair;
    order.decode(index, m_index, pair);
    const int head = pair % order.num_heads, batch = pair / order.num_heads;
    w.store_output(o, lse, o_batch_stride, o_head_stride, o_row_stride, lse_batch_stride,
                   lse_head_stride, cu_seqlens_q ? 0 : batch, head, batch, cu_seqlens_q,
                   cu_seqlens_k, w.mask.seqlen_q, head_dim,
                   kDropout && w.dropout.active() ? dropout_scale : 1.f);
  }
}

// kOptions: window, softcap and ALiBi (run-time values; a window runs with kCausal off,
// its right edge bounding the keys); kDropout (with kOptions): dropout of P.
// One tile a block (grid: m blocks, heads, batch), or kPersistent: m_blocks .. num_tiles
// give the tiles and their order (TileOrder), and tile_sched two counters, zero at the
// launch (and again at its end: the last block done resets them): the tiles taken, and
// the blocks done.
template <class Elem, int kHeadDim, int kBlockN, int kConsumers, int kStages, bool kOverlap,
          bool kPingpong, bool kCausal, bool kOptions, bool kDropout, bool kPersistent>
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
                          const int* __restrict__ cu_seqlens_k, int m_blocks, int num_heads,
                          int num_tiles, int* __restrict__ tile_sched) {
  static_assert(!kDropout || kOptions, "the dropout kernels are options kernels");
  using T =
      FwdTraits<Elem, kHeadDim, kBlockN, kConsumers, kStages, kOverlap, kPingpong, kPersistent>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const FwdSmem<T> sm{(smem_addr(smem_raw) + 1023u) & ~1023u};
  check_dynamic_smem(T::kSmemBytes);  // the host's launch (Sm90FwdSpec.smem_bytes) agrees
  if constexpr (kPersistent) {
    flash_fwd_sm90_persistent<T, kCausal, kOptions, kDropout>(
        sm, tm_q, tm_k, tm_v, o, lse, o_batch_stride, o_head_stride, o_row_stride,
        lse_batch_stride, lse_head_stride, seqlen_q, seqlen_k, head_dim, heads_per_kv,
        scale_log2, window_left, window_right, softcap_in, softcap_out, alibi_slopes,
        alibi_batch_stride, dropout_threshold, dropout_scale, dropout_seed, dropout_bh0,
        cu_seqlens_q, cu_seqlens_k, TileOrder{m_blocks, num_heads, num_tiles},
        tile_sched);
    return;
  }

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
  c.bind(sm, mask, scale_log2, warpgroup, tid);
  c.start_tile(softcap_in, softcap_out,
               kOptions && alibi_slopes ? alibi_slopes[batch * alibi_batch_stride + head] : 0.f,
               seqlen_k - seqlen_q,
               Dropout<kDropout>::make(dropout_threshold, dropout_seed,
                                       dropout_bh0 + u32(batch) * gridDim.y + head),
               m0, tid);

  // kPingpong: warpgroup 0 goes first; warpgroup 1's extra turn is taken back at the end
  if (T::kPingpong && c.wg == 1) c.pass_turn();
  if (n_iters > 0) {
    mbar_wait(sm.q_full(), 0);
    if constexpr (kOverlap) {
      c.run_overlapped(n_block_max, n_iters, 0);
    } else {
      c.run_sequential(n_block_max, n_iters, 0);
    }
  }
  if (T::kPingpong && c.wg == 0) c.wait_turn();

  // ---- epilogue ----
  c.store_output(o, lse, o_batch_stride, o_head_stride, o_row_stride, lse_batch_stride,
                 lse_head_stride, tm_batch, head, batch, cu_seqlens_q, cu_seqlens_k, seqlen_q,
                 head_dim, kDropout && c.dropout.active() ? dropout_scale : 1.f);
}

}  // namespace sm90
}  // namespace cuflash
