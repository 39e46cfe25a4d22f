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
//       mask, online softmax: m_i, l_i, rescale of o_acc, P = exp2(...)  softmax.cuh
//       O += P V_j          wgmma, P from registers, V in shared memory
//     then o_acc / l_i and lse are written from registers.
// The score matrix never reaches global memory. The host encodes the tensor maps and
// picks the template arguments (cuflash/_sm90.py).
#include "common.cuh"
#include "mask.cuh"
#include "softmax.cuh"
#include "warp_gemm.cuh"
#include "sm90/tma.cuh"
#include "sm90/wgmma.cuh"

namespace cuflash {
namespace sm90 {

template <class Elem, int kHeadDim_, int kBlockN_, int kConsumers_, int kStages_>
struct FwdTraits {
  static constexpr bool kIsBf16 = Elem::kIsBf16;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kStages = kStages_;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kNTiles = kBlockN / 8;    // n8 column tiles of S
  static constexpr int kDTiles = kHeadDim / 8;   // n8 column tiles of O
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column (128-byte) blocks of a row
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;  // one K or V tile
  static constexpr int kBarrierBytes = 64;
  // +1024: the dynamic shared memory is aligned to 1024 bytes by hand
  static constexpr int kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
  // registers a thread: the producer warpgroup gives its registers to the consumers
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;

  static_assert(kHeadDim % 64 == 0, "head dims in whole 128-byte column blocks");
  static_assert(kBlockN % 64 == 0 && kBlockN <= 256, "key tiles of 64..256");
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

// A tile of `rows` rows at (row0, head, batch): one box per 64-column block, each landing
// as `rows` x 128 bytes.
template <int kColBlocks>
CUFLASH_DEVICE void load_tile(u32 dst, const TensorMap& map, u32 bar, int rows, int row0,
                              int head, int batch) {
#pragma unroll
  for (int c = 0; c < kColBlocks; ++c) tma_load_4d(dst + c * rows * 128, map, bar, c * 64, row0, head, batch);
}

template <class Elem, int kHeadDim, int kBlockN, int kConsumers, int kStages, bool kCausal>
__global__ void __launch_bounds__(128 * (kConsumers + 1), 1)
    flash_fwd_sm90_kernel(const __grid_constant__ TensorMap tm_q,
                          const __grid_constant__ TensorMap tm_k,
                          const __grid_constant__ TensorMap tm_v, u16* __restrict__ o,
                          float* __restrict__ lse, i64 o_batch_stride, i64 o_head_stride,
                          i64 o_row_stride, i64 lse_batch_stride, i64 lse_head_stride,
                          int seqlen_q, int seqlen_k, int head_dim, int heads_per_kv,
                          float scale_log2) {
  using T = FwdTraits<Elem, kHeadDim, kBlockN, kConsumers, kStages>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const FwdSmem<T> sm{(smem_addr(smem_raw) + 1023u) & ~1023u};

  // Causal blocks are launched heaviest (last query rows) first.
  const int m_block = kCausal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int m0 = m_block * T::kBlockM;
  const Mask<kCausal> mask{seqlen_q, seqlen_k, 0, 0};
  const int n_block_max = mask.template n_block_max<kBlockN>(m0, T::kBlockM);
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
      if (n_block_max > 0) {
        mbar_expect_tx(sm.q_full(), T::kQBytes);
        load_tile<T::kColBlocks>(sm.q(), tm_q, sm.q_full(), T::kBlockM, m0, head, batch);
      }
      for (int it = 0; it < n_block_max; ++it) {
        const int n = n_block_max - 1 - it, st = it % kStages;
        const u32 parity = ((it / kStages) & 1) ^ 1;
        mbar_wait(sm.k_empty(st), parity);
        mbar_expect_tx(sm.k_full(st), T::kKVBytes);
        load_tile<T::kColBlocks>(sm.k(st), tm_k, sm.k_full(st), kBlockN, n * kBlockN, kv_head,
                                 batch);
        mbar_wait(sm.v_empty(st), parity);
        mbar_expect_tx(sm.v_full(st), T::kKVBytes);
        load_tile<T::kColBlocks>(sm.v(st), tm_v, sm.v_full(st), kBlockN, n * kBlockN, kv_head,
                                 batch);
      }
    }
    return;
  }

  // ---- consumers: 64 query rows a warpgroup ----
  regs_alloc<T::kConsumerRegs>();
  const int tid = threadIdx.x - 128 * warpgroup;  // within the warpgroup
  const int lane = tid & 31;
  const int wg = warpgroup - 1;
  const int warp_row0 = m0 + wg * 64 + (tid >> 5) * 16;  // this warp's 16 rows

  float o_acc[1][T::kDTiles][4];
#pragma unroll
  for (int d = 0; d < T::kDTiles; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[0][d][e] = 0.f;
  OnlineSoftmax<1> softmax;
  softmax.init();

  if (n_block_max > 0) mbar_wait(sm.q_full(), 0);
  // Q rows of this warpgroup: 64 rows into each column block
  const u32 q_rows = sm.q() + wg * 64 * 128;
  for (int it = 0; it < n_block_max; ++it) {
    const int n = n_block_max - 1 - it, st = it % kStages;
    const u32 parity = (it / kStages) & 1;

    // S = Q K_j^T: kHeadDim / 16 products of k16, both operands K-major
    float s[1][T::kNTiles][4];
    mbar_wait(sm.k_full(st), parity);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const u32 col = (kk % 4) * 32;  // bytes into the column block
      const u64 da = smem_desc(q_rows + (kk / 4) * T::kBlockM * 128 + col, 16);
      const u64 db = smem_desc(sm.k(st) + (kk / 4) * kBlockN * 128 + col, 16);
      wgmma_ss<kBlockN, T::kIsBf16>(s[0], da, db, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s[0]);
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.k_empty(st));

    if (mask.template tile_needs_mask<kBlockN, T::kBlockM>(n, m0)) {
      mask.apply(s, warp_row0, n * kBlockN, lane);
    }
    softmax.template update<true>(s, o_acc, scale_log2);

    // O += P V_j: P from registers, V MN-major (its rows are the k dimension)
    u32 p[1][kBlockN / 16][4];
    pack_frags<T::kIsBf16 ? kPrecBF16 : kPrecF16, 1, kBlockN>(p, s);
    mbar_wait(sm.v_full(st), parity);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const u64 db = smem_desc(sm.v(st) + kk * 16 * 128, kBlockN * 128);
      wgmma_rs<kHeadDim, T::kIsBf16>(o_acc[0], p[0][kk], db, true);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o_acc[0]);
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.v_empty(st));
  }

  // ---- epilogue: o_acc / l_i and lse, straight from registers ----
  float lse_rows[1][2];
  softmax.finalize(o_acc, lse_rows, scale_log2);
  u16* o_tile = o + i64(batch) * o_batch_stride + i64(head) * o_head_stride;
  float* lse_tile = lse + i64(batch) * lse_batch_stride + i64(head) * lse_head_stride;
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

}  // namespace sm90
}  // namespace cuflash
