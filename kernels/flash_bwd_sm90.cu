// cuflash: attention backward for Hopper (sm_90a): TMA tile loads, wgmma products, a
// producer warpgroup. The math is that of the portable backward (docs/backward.md).
//
// One thread block owns kBlockN = 128 keys of one (batch, kv head) and keeps K_j and V_j
// in shared memory; dK_j and dV_j accumulate in registers while it walks the query tiles
// (64 rows) of every query head of its group:
//   warpgroup 0 (producer): one thread loads K_j, V_j once, then Q_i and dO_i, with their
//     rows' lse and delta, into a ring of two stages (full/empty mbarriers)
//   warpgroups 1, 2 (consumers): 64 keys each; per query tile:
//       S^T  = K Q_i^T            wgmma, both operands K-major in shared memory
//       dP^T = V dO_i^T           wgmma
//       P^T  = exp2(S^T scale log2 e - lse log2 e), masked    (recompute from lse)
//              (kOptions: softcap, ALiBi, window; kDropout: dropped entries negated)
//       dV  += P^T dO_i           wgmma, P^T from registers, dO_i MN-major
//       dS^T = P^T (dP^T - delta)  (times 1 - tanh^2 with a softcap; with dropout
//                                  P^T (Z dP^T / (1 - p) - delta))
//       dK  += dS^T Q_i           wgmma, dS^T from registers
//       dS^T -> shared memory (both warpgroups' keys), then
//       dQ_i += dS K              wgmma, both operands MN-major; each warpgroup its 64
//                                 columns (d64: the two take turns), added to the float32
//                                 buffer by atomics
//   in the fragment order of the portable kernel, so the same conversion pass reads it.
// The plain kernels at d128 (kDqGroup) leave dQ to the producer warpgroup: it computes
// dQ_i = dS K and adds it between its loads, and the consumers hand it dS^T through a
// full and an empty mbarrier per dS^T buffer, so that they never wait for each other.
// Deterministic mode (kDeterministic, with dq_sem): the blocks add to each dQ tile in the
// order of their key tiles (DqTurn, last first), so every run sums in the same order.
// Scores and probabilities never reach global memory. Packed sequences as in
// flash_fwd_sm90.cu: tiles past a sequence's end read the next one's rows, hidden by the
// mask (queries: their lse is +inf, so P = 0).
#include "common.cuh"
#include "dropout.cuh"
#include "mask.cuh"
#include "scores.cuh"
#include "seqlens.cuh"
#include "warp_gemm.cuh"
#include "sm90/tma.cuh"
#include "sm90/wgmma.cuh"

namespace cuflash {
namespace sm90 {

// kWide (head dim 256, flash_bwd_sm90_wide_kernel): 64 keys a block, both warpgroups', whose
// dK and dV columns they split; a dS^T buffer holds the step's P^T tile too, after it.
template <class Elem, int kHeadDim_>
struct BwdTraits {
  static constexpr bool kIsBf16 = Elem::kIsBf16;
  static constexpr int kPrec = kIsBf16 ? kPrecBF16 : kPrecF16;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kWide = kHeadDim > 128;
  static constexpr int kBlockN = kWide ? 64 : 128;  // keys a block (else 64 a warpgroup)
  static constexpr int kBlockM = 64;   // queries a step (wide: 32 a warpgroup in S^T, dP^T)
  static constexpr int kStages = 2;
  static constexpr int kColBlocks = kHeadDim / 64;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;    // Q_i or dO_i
  static constexpr int kPBytes = kBlockN * kBlockM * 2;     // dS^T (or P^T), one tile
  static constexpr int kDSBytes = (kWide ? 2 : 1) * kPBytes;  // one buffer
  static constexpr int kStatBytes = kBlockM * 4;            // lse_log2 or delta of Q_i's rows
  static constexpr int kSmemBytes =
      1024 + 2 * kKVBytes + 2 * kStages * (kQBytes + kStatBytes) + 2 * kDSBytes + 128;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256,
                "sm_90a backward: head dims 64, 128 and 256");
  static_assert(Elem::kWords == 1, "16-bit inputs only");
};

template <class T>
struct BwdSmem {
  u32 base;
  CUFLASH_DEVICE u32 k() const { return base; }
  CUFLASH_DEVICE u32 v() const { return base + T::kKVBytes; }
  CUFLASH_DEVICE u32 q(int st) const { return base + 2 * T::kKVBytes + st * T::kQBytes; }
  CUFLASH_DEVICE u32 dout(int st) const {
    return base + 2 * T::kKVBytes + (T::kStages + st) * T::kQBytes;
  }
  CUFLASH_DEVICE u32 ds(int buf) const {
    return base + 2 * T::kKVBytes + 2 * T::kStages * T::kQBytes + buf * T::kDSBytes;
  }
  CUFLASH_DEVICE u32 lse(int st) const {
    return base + 2 * T::kKVBytes + 2 * T::kStages * T::kQBytes + 2 * T::kDSBytes +
           st * T::kStatBytes;
  }
  CUFLASH_DEVICE u32 delta(int st) const { return lse(T::kStages + st); }
  CUFLASH_DEVICE u32 bar(int i) const { return lse(2 * T::kStages) + 8 * i; }
  CUFLASH_DEVICE u32 kv_full() const { return bar(0); }
  CUFLASH_DEVICE u32 qdo_full(int st) const { return bar(1 + 2 * st); }
  CUFLASH_DEVICE u32 qdo_empty(int st) const { return bar(2 + 2 * st); }
  // kDqGroup: a dS^T buffer's full (both consumer warpgroups have stored their halves)
  // and empty (the dQ warpgroup has read it)
  CUFLASH_DEVICE u32 ds_full(int buf) const { return bar(1 + 2 * T::kStages + 2 * buf); }
  CUFLASH_DEVICE u32 ds_empty(int buf) const { return bar(2 + 2 * T::kStages + 2 * buf); }
};

// 16-bit pair (col, col + 1) of row `row` into a 128-byte-swizzled tile of 64 columns:
// chunk col / 8 of the row moves to chunk (col / 8) ^ (row % 8).
CUFLASH_DEVICE u32 swizzled(u32 tile, int row, int col) {
  return tile + row * 128 + ((((col >> 3) ^ (row & 7)) << 4) | ((col & 7) << 1));
}

// P^T of a warp's 16 keys x 8 kQ queries with the options (kOptions), one entry at a time:
// the score transform (kSoftcap, kAlibi; scores.cuh), exp2 against lse, the mask and
// (kDropout, `dropout` on) the dropout of the entries whose `keep` bit is clear
// (Dropout::keep_bits_transposed), which are negated: the backward's sign mark.
// Gives P^T as dV's A fragments in `pf` (dropped entries 0) and leaves in `s` what dS^T
// multiplies: P^T, times the softcap's 1 - tanh^2 (kept in float32, so no array of it
// has to live beside the scores).
// The plain kernels take it too (no transform, no dropout; `scores` unused).
// key0: the warp's first key; m0: the tile's first query; lse_tile: the tile's lse * log2(e)
// in shared memory; units: those of the raw products (scale * log2(e)) without a transform.
template <bool kIsBf16, bool kDropout, bool kSoftcap, bool kAlibi, bool kMasked, class MaskT,
          int kQ>
CUFLASH_DEVICE void probabilities_as(float (&s)[kQ][4], u32 (&pf)[kQ / 2][4],
                                     const ScoreMod<true>& scores, float raw_units,
                                     const MaskT& mask, bool dropout, u32 keep, u32 lse_tile,
                                     int key0, int m0, int lane) {
  const float units = kSoftcap || kAlibi ? scores.units() : raw_units;
  // ALiBi's i + offset - j: a per-thread float plus a compile-time step (exact below 2^24)
  const float dist0 = float(m0 + scores.offset + (lane & 3) * 2 - key0 - (lane >> 2));
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    float lse[2];
    ld_shared_f2(lse[0], lse[1], lse_tile + (j * 8 + (lane & 3) * 2) * 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = key0 + (lane >> 2) + 8 * h;
      float p[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int query = j * 8 + (lane & 3) * 2 + e;  // within the tile
        float x = s[j][2 * h + e], t = 0.f;
        if (kSoftcap) {
          x = t = tanh_softcap<false>(x * scores.softcap_in);
        } else if (kAlibi) {
          x *= scores.scale_log2;
        }
        if (kAlibi) x = fmaf(scores.alibi, fabsf(dist0 + float(j * 8 + e - 8 * h)), x);
        p[e] = exp2_approx(fmaf(x, units, -lse[e]));
        // hidden entries are zeroed after the exp2 (not set to -inf before it)
        if (kMasked && mask.hidden_at(m0 + query, key)) p[e] = 0.f;
        s[j][2 * h + e] = kSoftcap ? p[e] * fmaf(-t, t, 1.f) : p[e];
        if (kDropout && dropout && !((keep >> (j * 4 + 2 * h + e)) & 1u)) {
          s[j][2 * h + e] = -s[j][2 * h + e];
          p[e] = 0.f;
        }
      }
      pf[j >> 1][2 * (j & 1) + h] = pack2<kIsBf16>(p[0], p[1]);
    }
  }
}

// probabilities_as with the run-time choices (transform, mask) taken once, outside its
// loops.
template <bool kIsBf16, bool kDropout, bool kSoftcap, bool kAlibi, class MaskT, int kQ>
CUFLASH_DEVICE void probabilities_masked_or_not(float (&s)[kQ][4], u32 (&pf)[kQ / 2][4],
                                                const ScoreMod<true>& scores, float raw_units,
                                                const MaskT& mask, bool masked, bool dropout,
                                                u32 keep, u32 lse_tile, int key0, int m0,
                                                int lane) {
  if (masked) {
    probabilities_as<kIsBf16, kDropout, kSoftcap, kAlibi, true>(
        s, pf, scores, raw_units, mask, dropout, keep, lse_tile, key0, m0, lane);
  } else {
    probabilities_as<kIsBf16, kDropout, kSoftcap, kAlibi, false>(
        s, pf, scores, raw_units, mask, dropout, keep, lse_tile, key0, m0, lane);
  }
}

template <bool kIsBf16, bool kDropout, class MaskT, int kQ>
CUFLASH_DEVICE void probabilities_with_options(float (&s)[kQ][4], u32 (&pf)[kQ / 2][4],
                                               const ScoreMod<true>& scores, float raw_units,
                                               const MaskT& mask, bool masked, bool dropout,
                                               u32 keep, u32 lse_tile, int key0, int m0,
                                               int lane) {
  if (scores.has_softcap() && scores.has_alibi()) {
    probabilities_masked_or_not<kIsBf16, kDropout, true, true>(
        s, pf, scores, raw_units, mask, masked, dropout, keep, lse_tile, key0, m0, lane);
  } else if (scores.has_softcap()) {
    probabilities_masked_or_not<kIsBf16, kDropout, true, false>(
        s, pf, scores, raw_units, mask, masked, dropout, keep, lse_tile, key0, m0, lane);
  } else if (scores.has_alibi()) {
    probabilities_masked_or_not<kIsBf16, kDropout, false, true>(
        s, pf, scores, raw_units, mask, masked, dropout, keep, lse_tile, key0, m0, lane);
  } else {
    probabilities_masked_or_not<kIsBf16, kDropout, false, false>(
        s, pf, scores, raw_units, mask, masked, dropout, keep, lse_tile, key0, m0, lane);
  }
}

// The deterministic mode's turns: the key tiles that reach a dQ tile are consecutive
// (the mask's query-tile range grows with the key tile), and they add their parts from the
// last down: n_block adds after its successor n_block + 1 has. dq_sem holds, per dQ tile
// and 64-column block, the number of the key tile that added last (0 at the start of the
// call). The deterministic grid is launched last key tile first, so a successor is
// running or done; in a causal or windowed launch it reaches each shared query tile two
// steps ahead of its predecessor, so nobody waits once the blocks run.
// A turn is passed on late (at the warpgroup's next dQ tile, or after the loop): by then
// the adds have landed, and the fence that publishes them costs little.
struct DqTurn {
  int* sem;                  // the flags (dq_sem)
  int n_block;               // this block's key tile
  int succ_begin, succ_end;  // query tiles the successor reaches (empty if none)
  int* pending;              // the last tile's flag, not yet passed on
  // (stats_row: the tile's first row in the statistics' layout, whose tiles of 64 rows
  // are distinct across heads and sequences)
  CUFLASH_DEVICE int* flag(i64 stats_row, int col_block) const {
    return sem + (stats_row >> 6) * 2 + col_block;
  }
  CUFLASH_DEVICE bool must_wait(int m_block) const {
    return m_block >= succ_begin && m_block < succ_end;
  }
  static CUFLASH_DEVICE int load_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
  }
  // Thread 0 of the warpgroup, early (while the dQ product runs): the flag's value.
  CUFLASH_DEVICE int peek(const int* f, bool wait, int tid) const {
    return tid == 0 && wait ? load_acquire(f) : n_block + 1;
  }
  // Before the warpgroup's atomics on the tile of flag f: the previous tile's turn passed
  // on, then (thread 0, then the warpgroup's named barrier) until the successor's turn has
  // passed; `seen`: peek's value.
  CUFLASH_DEVICE void wait(int* f, int seen, int wg, int tid) {
    pass_pending(wg, tid);
    if (tid == 0) {
      while (seen != n_block + 1) seen = load_acquire(f);
    }
    named_sync(wg);
    pending = f;
  }
  // Every thread's adds to the pending tile visible, then its flag set to this block.
  CUFLASH_DEVICE void pass_pending(int wg, int tid) {
    if (pending == nullptr) return;
    __threadfence();
    named_sync(wg);
    if (tid == 0) {
      asm volatile("st.release.gpu.global.s32 [%0], %1;\n" ::"l"(pending), "r"(n_block)
                   : "memory");
    }
    pending = nullptr;
  }
  static CUFLASH_DEVICE void named_sync(int wg) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
  }
};

// A block's keys and the query tiles that see them: key tile n_block (kBlockN keys) of one
// (batch, kv head), blockIdx.y = kv head * kv_splits + split, whose query heads head0 ..
// head0 + heads_per_kv / kv_splits - 1 it walks; steps: query tiles m_begin .. m_end - 1 of
// each of them.
template <class T, bool kCausal, bool kOptions>
struct BwdBlock {
  int batch, kv_head, head0, n0, tm_batch, m_begin, m_end, steps;
  bool has_keys;  // false past a packed sequence's end
  SeqLens seq;
  i64 stats0;     // row of this sequence's statistics, head 0 (seqlens.cuh)
  Mask<kCausal, kOptions> mask;

  CUFLASH_DEVICE BwdBlock(int n_block, int kv_splits, int heads_per_kv, int num_heads_q,
                          int seqlen_q, int seqlen_k, int seqlen_q_pad, int window_left,
                          int window_right, const int* cu_seqlens_q, const int* cu_seqlens_k) {
    batch = blockIdx.z;
    kv_head = blockIdx.y / kv_splits;
    const int split = blockIdx.y - kv_head * kv_splits;
    const int heads = heads_per_kv / kv_splits;  // query heads of this block
    head0 = kv_head * heads_per_kv + split * heads;
    seq = SeqLens::get(cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k);
    n0 = n_block * T::kBlockN;
    has_keys = n0 < seq.seqlen_k;
    tm_batch = seq.packed ? 0 : batch;  // the tensor maps' batch coordinate
    stats0 = seq.stats_start(batch, num_heads_q, seqlen_q_pad);
    mask = Mask<kCausal, kOptions>{seq.seqlen_q, seq.seqlen_k, window_left, window_right};
    m_begin = mask.template m_block_min<T::kBlockM>(n0);
    m_end = mask.template m_block_end<T::kBlockM, T::kBlockN>(n0);
    steps = max(m_end - m_begin, 0) * heads;
  }

  // The deterministic mode's turns of key tile n_block (its successor's query tiles, as
  // m_begin and m_end for n0 + kBlockN).
  CUFLASH_DEVICE DqTurn dq_turn(int* dq_sem, int n_block) const {
    const bool has_succ = n0 + T::kBlockN < seq.seqlen_k;
    return DqTurn{
        dq_sem, n_block, has_succ ? mask.template m_block_min<T::kBlockM>(n0 + T::kBlockN) : 0,
        has_succ ? mask.template m_block_end<T::kBlockM, T::kBlockN>(n0 + T::kBlockN) : 0,
        nullptr};
  }
};

// The barriers: K/V full; per stage, Q/dO full (the producer's expect_tx) and empty (one
// arrival per consumer warp); kDqGroup: per dS^T buffer, full (one arrival per consumer
// thread) and empty (one per warp of the dQ warpgroup).
template <class T, bool kDqGroup = false>
CUFLASH_DEVICE void init_bwd_barriers(const BwdSmem<T>& sm) {
  mbar_init(sm.kv_full(), 1);
#pragma unroll
  for (int st = 0; st < T::kStages; ++st) {
    mbar_init(sm.qdo_full(st), 1);
    mbar_init(sm.qdo_empty(st), 8);
  }
  if constexpr (kDqGroup) {
#pragma unroll
    for (int buf = 0; buf < 2; ++buf) {
      mbar_init(sm.ds_full(buf), 256);
      mbar_init(sm.ds_empty(buf), 4);
    }
  }
  mbar_init_fence();
}

// dS^T = P^T (dP^T - delta), in place of dP^T, over a warp's kQ column tiles of queries
// (delta_tile: their delta in shared memory); with dropout (`dropped`), P^T < 0 marks a
// dropped entry, whose dP^T counts as 0, and kept ones take dP^T / (1 - p).
template <int kQ>
CUFLASH_DEVICE void ds_in_place(float (&dp)[kQ][4], const float (&s)[kQ][4], u32 delta_tile,
                                bool dropped, float dropout_scale, int lane) {
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    float delta_j[2];
    ld_shared_f2(delta_j[0], delta_j[1], delta_tile + (j * 8 + (lane & 3) * 2) * 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float d = delta_j[e & 1];
      if (dropped) {
        const float dpz = s[j][e] >= 0.f ? dp[j][e] * dropout_scale : 0.f;
        dp[j][e] = fabsf(s[j][e]) * (dpz - d);
      } else {
        dp[j][e] = s[j][e] * (dp[j][e] - d);
      }
    }
  }
}

// dS^T = P^T (dP^T - delta) as ds_in_place, with P^T read back from its 16-bit A fragments
// `pf` (as a plain fp16/bf16 implementation rounds P before dS), so that the float32 P^T
// need not stay live beside dP^T.
template <bool kIsBf16, int kQ>
CUFLASH_DEVICE void ds_from_frags(float (&dp)[kQ][4], const u32 (&pf)[kQ / 2][4], u32 delta_tile,
                                  int lane) {
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    float delta_j[2];
    ld_shared_f2(delta_j[0], delta_j[1], delta_tile + (j * 8 + (lane & 3) * 2) * 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float p[2];
      unpack2<kIsBf16>(pf[j >> 1][2 * (j & 1) + h], p[0], p[1]);
#pragma unroll
      for (int e = 0; e < 2; ++e) dp[j][2 * h + e] = p[e] * (dp[j][2 * h + e] - delta_j[e]);
    }
  }
}

// The epilogue of a warpgroup's dK and dV, kTiles column tiles from column 8 j0:
// add_dkv_partial adds them to a split GQA group's float32 partial sums (dk_tile, dv_tile:
// the 64-key tile, in the dQ buffer's fragment order); store_dkv writes dK * scale and
// dV * dv_scale as 16-bit rows key, key + 8 (dk_rows, dv_rows: the sequence's first row)
// where they lie inside the sequence and the head dim.
template <int kTiles>
CUFLASH_DEVICE void add_dkv_partial(const float (&dk_acc)[kTiles][4],
                                    const float (&dv_acc)[kTiles][4], float* dk_tile,
                                    float* dv_tile, int j0, int warp, int lane) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    const int jj = j0 + j;  // the column tile in the whole row
    const i64 frag = (((warp + (jj / 8) * 4) * 8 + jj % 8) * 32 + lane) * 4;
    red_add_f32x4(dk_tile + frag, dk_acc[j]);
    red_add_f32x4(dv_tile + frag, dv_acc[j]);
  }
}
template <bool kIsBf16, int kTiles>
CUFLASH_DEVICE void store_dkv(const float (&dk_acc)[kTiles][4], const float (&dv_acc)[kTiles][4],
                              u16* dk_rows, u16* dv_rows, i64 dk_row_stride, i64 dv_row_stride,
                              int key, int seqlen_k, int j0, int head_dim, float scale,
                              float dv_scale, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (key + h * 8 >= seqlen_k) continue;
    u16* dk_row = dk_rows + i64(key + h * 8) * dk_row_stride;
    u16* dv_row = dv_rows + i64(key + h * 8) * dv_row_stride;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const int col = (j0 + j) * 8 + (lane & 3) * 2;
      if (col < head_dim) {
        *reinterpret_cast<u32*>(dk_row + col) =
            pack2<kIsBf16>(dk_acc[j][2 * h] * scale, dk_acc[j][2 * h + 1] * scale);
        *reinterpret_cast<u32*>(dv_row + col) =
            pack2<kIsBf16>(dv_acc[j][2 * h] * dv_scale, dv_acc[j][2 * h + 1] * dv_scale);
      }
    }
  }
}

// The loads of step `it`: Q_i, dO_i and their rows' lse and delta, once its stage is free.
template <class T>
CUFLASH_DEVICE void produce_step(const BwdSmem<T>& sm, const TensorMap& tm_q,
                                 const TensorMap& tm_do, const float* lse_log2,
                                 const float* delta, const SeqLens& seq, int tm_batch,
                                 int head0, int m_begin, int m_end, int it, i64 stats0,
                                 int seqlen_q_pad) {
  const int st = it % T::kStages;
  const int head = head0 + it / (m_end - m_begin);
  const int m0 = (m_begin + it % (m_end - m_begin)) * T::kBlockM;
  mbar_wait(sm.qdo_empty(st), ((it / T::kStages) & 1) ^ 1);
  mbar_expect_tx(sm.qdo_full(st), 2 * T::kQBytes + 2 * T::kStatBytes);
  load_rows<T::kColBlocks>(sm.q(st), tm_q, sm.qdo_full(st), T::kBlockM, seq.q_start + m0,
                           head, tm_batch);
  // (the statistics have seqlen_q_pad rows a head: whole tiles, 16-byte aligned)
  const i64 stats = stats0 + i64(head) * seqlen_q_pad + m0;
  bulk_load(sm.lse(st), lse_log2 + stats, T::kStatBytes, sm.qdo_full(st));
  bulk_load(sm.delta(st), delta + stats, T::kStatBytes, sm.qdo_full(st));
  load_rows<T::kColBlocks>(sm.dout(st), tm_do, sm.qdo_full(st), T::kBlockM, seq.q_start + m0,
                           head, tm_batch);
}

// The producer's first loads: K_j and V_j of the block's kBlockN keys, once.
template <class T>
CUFLASH_DEVICE void produce_kv(const BwdSmem<T>& sm, const TensorMap& tm_q,
                               const TensorMap& tm_k, const TensorMap& tm_v,
                               const TensorMap& tm_do, const SeqLens& seq, int n0, int kv_head,
                               int tm_batch) {
  prefetch_tensor_map(tm_q);
  prefetch_tensor_map(tm_do);
  mbar_expect_tx(sm.kv_full(), 2 * T::kKVBytes);
  load_rows<T::kColBlocks>(sm.k(), tm_k, sm.kv_full(), T::kBlockN, seq.k_start + n0, kv_head,
                           tm_batch);
  load_rows<T::kColBlocks>(sm.v(), tm_v, sm.kv_full(), T::kBlockN, seq.k_start + n0, kv_head,
                           tm_batch);
}

// The producer's one thread: K_j and V_j once, then Q_i and dO_i (with their rows' lse and
// delta) of each step into the ring of kStages stages.
template <class T>
CUFLASH_DEVICE void produce_steps(const BwdSmem<T>& sm, const TensorMap& tm_q,
                                  const TensorMap& tm_k, const TensorMap& tm_v,
                                  const TensorMap& tm_do, const float* lse_log2,
                                  const float* delta, const SeqLens& seq, int n0, int kv_head,
                                  int tm_batch, int head0, int m_begin, int m_end, int steps,
                                  i64 stats0, int seqlen_q_pad) {
  produce_kv<T>(sm, tm_q, tm_k, tm_v, tm_do, seq, n0, kv_head, tm_batch);
  for (int it = 0; it < steps; ++it) {
    produce_step<T>(sm, tm_q, tm_do, lse_log2, delta, seq, tm_batch, head0, m_begin, m_end,
                    it, stats0, seqlen_q_pad);
  }
}

// X^T = rows tile^T, 64 keys x 64 queries (S^T = K Q_i^T, dP^T = V dO_i^T; both operands
// K-major), issued, not committed or awaited.
template <class T>
CUFLASH_DEVICE void issue_transposed(float (&acc)[8][4], u32 key_rows, u32 query_tile) {
#pragma unroll
  for (int kk = 0; kk < T::kHeadDim / 16; ++kk) {
    const u32 col = (kk / 4) * T::kBlockN * 128 + (kk % 4) * 32;
    const u32 qcol = (kk / 4) * T::kBlockM * 128 + (kk % 4) * 32;
    wgmma_ss<64, T::kIsBf16>(acc, smem_desc(key_rows + col, 16),
                             smem_desc(query_tile + qcol, 16), kk > 0);
  }
}

template <class Elem, int kHeadDim, bool kCausal, bool kOptions, bool kDropout,
          bool kDeterministic>
__global__ void __launch_bounds__(384, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ TensorMap tm_q,
                          const __grid_constant__ TensorMap tm_k,
                          const __grid_constant__ TensorMap tm_v,
                          const __grid_constant__ TensorMap tm_do,
                          const float* __restrict__ lse_log2, const float* __restrict__ delta,
                          float* __restrict__ dq_accum, u16* __restrict__ dk,
                          u16* __restrict__ dv, i64 dk_batch_stride, i64 dk_head_stride,
                          i64 dk_row_stride, i64 dv_batch_stride, i64 dv_head_stride,
                          i64 dv_row_stride, float* __restrict__ dk_accum,
                          float* __restrict__ dv_accum, int kv_splits, int seqlen_q,
                          int seqlen_k, int seqlen_q_pad,
                          int num_heads_q, int head_dim, int heads_per_kv, float scale_log2,
                          float scale, int window_left, int window_right, float softcap_in,
                          float softcap_out, const float* __restrict__ alibi_slopes,
                          i64 alibi_batch_stride, u32 dropout_threshold, float dropout_scale,
                          u64 dropout_seed, u32 dropout_bh0, const int* __restrict__ cu_seqlens_q,
                          const int* __restrict__ cu_seqlens_k, int* __restrict__ dq_sem) {
  static_assert(!kDropout || kOptions, "the dropout kernels are options kernels");
  using T = BwdTraits<Elem, kHeadDim>;
  static_assert(!T::kWide, "head dims above 128: flash_bwd_sm90_wide_kernel");
  // The options kernels at d128 have no registers for an in-flight dP^T beside the score
  // transform: there dP^T = V dO^T is issued after P^T, together with dV's product.
  constexpr bool kLateDP = kOptions && kHeadDim == 128;
  // d64: the consumer warpgroups take turns at dQ (below)
  constexpr bool kDqTurns = kHeadDim == 64;
  // kDqGroup (the plain kernels at d128): the producer warpgroup computes each step's
  // dQ = dS K and adds it, between its loads, so that the two consumer warpgroups never
  // wait for each other: a dS^T buffer's full and empty mbarriers replace their barrier
  // (+2-3%, perf-log b15; it replaced b12's next S^T beside the consumers' dQ atomics).
  // Its consumers read P^T for dS^T back from P^T's 16-bit fragments, as a plain
  // fp16/bf16 implementation rounds P, so that they fit in 224 registers beside it.
  constexpr bool kDqGroup = !kOptions && !kDeterministic && kHeadDim == 128;
  // registers a thread: the producer warpgroup gives its registers to the two consumers
  // (the pool is 168 a thread: 2 x 224 + 56, or 2 x 240 + 24)
  constexpr int kProducerRegs = kDqGroup ? 56 : 24, kConsumerRegs = kDqGroup ? 224 : 240;
  static_assert(regs_split_fits(2, kConsumerRegs, kProducerRegs),
                "setmaxnreg: the consumers take more registers than the producer frees");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const BwdSmem<T> sm{(smem_addr(smem_raw) + 1023u) & ~1023u};
  // kv_splits > 1 (GQA with few blocks): the query heads of a group are split over
  // kv_splits blocks, which add their dK and dV to dk_accum and dv_accum (float32, in the
  // dQ buffer's fragment order, 64-key tiles) for a conversion pass to finish.
  // (the deterministic mode launches the last key tile first: DqTurn)
  const int n_block = kDeterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const BwdBlock<T, kCausal, kOptions> blk(n_block, kv_splits, heads_per_kv, num_heads_q,
                                           seqlen_q, seqlen_k, seqlen_q_pad, window_left,
                                           window_right, cu_seqlens_q, cu_seqlens_k);
  if (!blk.has_keys) return;  // packed: a shorter sequence
  const int batch = blk.batch, kv_head = blk.kv_head, head0 = blk.head0, n0 = blk.n0;
  const int tm_batch = blk.tm_batch, m_begin = blk.m_begin, m_end = blk.m_end;
  const int steps = blk.steps;
  const SeqLens seq = blk.seq;
  const i64 stats0 = blk.stats0;
  const auto mask = blk.mask;
  seqlen_q = seq.seqlen_q;
  seqlen_k = seq.seqlen_k;
  DqTurn turn = blk.dq_turn(dq_sem, n_block);
  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) init_bwd_barriers<T, kDqGroup>(sm);
  __syncthreads();

  // kDqGroup: the step count, computed again in each warpgroup from its factors (an opaque
  // move keeps the compiler from sharing it across them: held from before they split, it
  // was spilled)
  const auto steps_here = [&]() {
    int heads = heads_per_kv / kv_splits;
    asm volatile("mov.b32 %0, %0;\n" : "+r"(heads));
    return max(m_end - m_begin, 0) * heads;
  };
  if (warpgroup == 0) {
    // ---- producer ----
    regs_dealloc<kProducerRegs>();
    if constexpr (kDqGroup) {
      // ... and dQ: thread 0 loads K, V and the first kStages steps, then step it +
      // kStages once step it's dQ is added; every thread computes dQ_i = dS K, 32 columns
      // at a time (m64n32: its 16 accumulators), and adds it by atomics.
      const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
      const int n_steps = steps_here();
      if (n_steps == 0) return;
      if (tid == 0) {
        produce_kv<T>(sm, tm_q, tm_k, tm_v, tm_do, seq, n0, kv_head, tm_batch);
        for (int it = 0; it < min(n_steps, T::kStages); ++it) {
          produce_step<T>(sm, tm_q, tm_do, lse_log2, delta, seq, tm_batch, head0, m_begin,
                          m_end, it, stats0, seqlen_q_pad);
        }
      }
      mbar_wait(sm.kv_full(), 0);
#pragma unroll 1
      for (int it = 0; it < n_steps; ++it) {
        const int buf = it & 1;
        const int head = head0 + it / (m_end - m_begin);
        const int m0 = (m_begin + it % (m_end - m_begin)) * T::kBlockM;
        float* tile = dq_accum + (stats0 + i64(head) * seqlen_q_pad + m0) * kHeadDim;
        const u32 ds_tile = sm.ds(buf);
        mbar_wait(sm.ds_full(buf), (it >> 1) & 1);
#pragma unroll
        for (int cq = 0; cq < 4; ++cq) {
          // A = dS^T (MN-major: queries contiguous), B = K (MN-major: columns contiguous),
          // 32 columns at a time: 64-byte steps inside K's 128-byte column blocks
          // (K's address through an opaque move: hoisted out of the loop, its descriptors
          // would take half of the warpgroup's registers)
          u32 k_cols = sm.k() + (cq / 2) * T::kBlockN * 128 + (cq % 2) * 64;
          asm volatile("mov.b32 %0, %0;\n" : "+r"(k_cols));
          float dq[4][4];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < T::kBlockN / 16; ++kk) {
            wgmma_ss_tt<32, T::kIsBf16>(
                dq, smem_desc(ds_tile + kk * 16 * 128, T::kBlockN * 128),
                smem_desc(k_cols + kk * 16 * 128, T::kBlockN * 128), kk > 0);
          }
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(dq);
          if (cq == 3) {  // dS^T read: the consumers may store step it + 2's
            __syncwarp();
            if (lane == 0) mbar_arrive(sm.ds_empty(buf));
          }
          // fragment order of the portable kernel's dQ buffer (as below)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            red_add_f32x4(tile + ((warp + (cq / 2) * 4) * 8 + (cq % 2) * 4 + j) * 128 + lane * 4,
                          dq[j]);
          }
        }
        if (tid == 0 && it + T::kStages < n_steps) {
          produce_step<T>(sm, tm_q, tm_do, lse_log2, delta, seq, tm_batch, head0, m_begin,
                          m_end, it + T::kStages, stats0, seqlen_q_pad);
        }
      }
      return;
    }
    if (threadIdx.x == 0 && steps > 0) {
      produce_steps<T>(sm, tm_q, tm_k, tm_v, tm_do, lse_log2, delta, seq, n0, kv_head, tm_batch,
                       head0, m_begin, m_end, steps, stats0, seqlen_q_pad);
    }
    return;
  }

  // ---- consumers: 64 keys a warpgroup ----
  regs_alloc<kConsumerRegs>();
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x - 128 * warpgroup;
  const int lane = tid & 31, warp = tid >> 5;
  const int key_row0 = n0 + wg * 64 + warp * 16 + (lane >> 2);  // rows +0 and +8
  const u32 k_rows = sm.k() + wg * 64 * 128, v_rows = sm.v() + wg * 64 * 128;

  float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDim / 8][4];
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[j][e] = dv_acc[j][e] = 0.f;

  const int n_steps = kDqGroup ? steps_here() : steps;
  if (n_steps > 0) mbar_wait(sm.kv_full(), 0);
  for (int it = 0; it < n_steps; ++it) {
    const int st = it % T::kStages;
    const int head = head0 + it / (m_end - m_begin);
    const int m0 = (m_begin + it % (m_end - m_begin)) * T::kBlockM;
    const i64 stats = stats0 + i64(head) * seqlen_q_pad;

    // S^T = K Q_i^T and dP^T = V dO_i^T (64 keys x 64 queries each; kLateDP: dP^T later,
    // beside dV's product)
    float s[8][4];
    mbar_wait(sm.qdo_full(st), (it / T::kStages) & 1);
    wgmma_fence();
    issue_transposed<T>(s, k_rows, sm.q(st));
    wgmma_commit();
    float dp[8][4];
    if constexpr (!kLateDP) {
      issue_transposed<T>(dp, v_rows, sm.dout(st));
      wgmma_commit();
    }
    const auto dropout = Dropout<kDropout>::make(
        dropout_threshold, dropout_seed, dropout_bh0 + u32(batch) * num_heads_q + u32(head));
    u32 keep = 0u;  // kDropout: the keep mask, computed while S^T is on the tensor cores
    if constexpr (kDropout) {
      if (dropout.active()) {
        keep = dropout.template keep_bits_transposed<1, 8>(n0 + wg * 64 + warp * 16, m0, lane);
      }
    }
    wgmma_wait<kLateDP ? 0 : 1>();
    fence_regs(s);

    // P^T = exp2(S^T scale log2 e - lse log2 e); hidden keys and padded queries give 0
    u32 pf[4][4];  // P^T as A fragments (k = queries)
    const int key0 = n0 + wg * 64 + warp * 16;  // this warp's first key
    if constexpr (kOptions) {
      const float slope = alibi_slopes ? alibi_slopes[batch * alibi_batch_stride + head] : 0.f;
      const auto scores = ScoreMod<true>::make(scale_log2, softcap_in, softcap_out, slope,
                                               mask.offset());
      probabilities_with_options<T::kIsBf16, kDropout>(
          s, pf, scores, scale_log2, mask,
          mask.template tile_needs_mask<T::kBlockN, T::kBlockM>(n_block, m0), dropout.active(),
          keep, sm.lse(st), key0, m0, lane);
    } else {
      const bool masked = n0 + T::kBlockN > seqlen_k ||
                          (kCausal && n0 + T::kBlockN - 1 > m0 + mask.offset());
      probabilities_masked_or_not<T::kIsBf16, false, false, false>(
          s, pf, ScoreMod<true>{}, scale_log2, mask, masked, false, 0u, sm.lse(st), key0, m0,
          lane);
    }
    // dV += P^T dO_i (dO_i MN-major: its rows are the k dimension)
    wgmma_fence();
    if constexpr (kLateDP) {
      issue_transposed<T>(dp, v_rows, sm.dout(st));
      wgmma_commit();
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_rs<kHeadDim, T::kIsBf16>(dv_acc, pf[kk],
                                     smem_desc(sm.dout(st) + kk * 16 * 128, T::kBlockM * 128),
                                     true);
    }
    wgmma_commit();
    wgmma_wait<1>();  // dP^T has landed
    fence_regs(dp);

    // dS^T = P^T (dP^T - delta), in place of dP^T (dropout: P^T < 0 marks a dropped entry)
    if constexpr (kDqGroup) {
      ds_from_frags<T::kIsBf16>(dp, pf, sm.delta(st), lane);
    } else {
      ds_in_place(dp, s, sm.delta(st), kDropout && dropout_threshold != 0u, dropout_scale,
                  lane);
    }
    u32 dsf[4][4];
    {
      u32 tmp[1][4][4];
      pack_frags<T::kPrec, 1, 64>(tmp, reinterpret_cast<const float(&)[1][8][4]>(dp));
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) dsf[kk][r] = tmp[0][kk][r];
    }
    // dS^T into shared memory for dQ: rows are this block's keys, 64 query columns
    // (kDqGroup: once the dQ warpgroup has read step it - 2's from this buffer)
    const u32 ds_tile = sm.ds(it & 1);
    if constexpr (kDqGroup) mbar_wait(sm.ds_empty(it & 1), ((it >> 1) & 1) ^ 1);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wg * 64 + warp * 16 + (lane >> 2) + h * 8;
        const int col = j * 8 + (lane & 3) * 2;
        st_shared_b32(swizzled(ds_tile, row, col),
                      pack2<T::kIsBf16>(dp[j][2 * h], dp[j][2 * h + 1]));
      }
    if constexpr (kDqGroup) {  // to the dQ warpgroup
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      mbar_arrive(sm.ds_full(it & 1));
    }
    // dK += dS^T Q_i
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_rs<kHeadDim, T::kIsBf16>(dk_acc, dsf[kk],
                                     smem_desc(sm.q(st) + kk * 16 * 128, T::kBlockM * 128), true);
    }
    wgmma_commit();
    // dQ_i = dS K (64 queries x 64 columns; k = the block's 128 keys, both warpgroups'
    // dS^T). kDqGroup: the dQ warpgroup's (above). Otherwise at d128 (the deterministic
    // mode): each warpgroup computes its 64 columns, once both halves of dS^T are in
    // place. d64 (kDqTurns): the warpgroups take turns at the 64 columns; the step's owner
    // waits for the other's half of dS^T, the other only signals it and runs on into its
    // next step. (The owner releases the stage after its dQ product, so the other cannot
    // overwrite this dS^T buffer, two steps on, before it has been read.) Barrier ids: 1
    // for both warpgroups, or for turns 1 (warpgroup 0 waits) and 4 (warpgroup 1 waits).
    // (Turns at d128, the owner computing all 128 columns, were 10% slower: perf-log b7.)
    const bool dq_here = kDqGroup ? false : kDqTurns ? (it & 1) == wg : true;
    const int dq_cb = kDqTurns ? 0 : wg;  // dQ's 64-column block computed here
    if constexpr (!kDqGroup) {
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if (!kDqTurns) {
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
      } else if (dq_here) {
        asm volatile("bar.sync %0, 256;\n" ::"r"(1 + 3 * wg) : "memory");
      } else {
        asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - 3 * wg) : "memory");
      }
    }
    if (dq_here) {
      // A = dS^T (MN-major: queries contiguous), B = K (MN-major: columns contiguous)
      float dq[8][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < T::kBlockN / 16; ++kk) {
        wgmma_ss_tt<64, T::kIsBf16>(
            dq, smem_desc(ds_tile + kk * 16 * 128, T::kBlockN * 128),
            smem_desc(sm.k() + dq_cb * T::kBlockN * 128 + kk * 16 * 128, T::kBlockN * 128),
            kk > 0);
      }
      wgmma_commit();
      int* flag = nullptr;
      int seen = 0;
      if constexpr (kDeterministic) {
        flag = turn.flag(stats + m0, dq_cb);
        seen = turn.peek(flag, turn.must_wait(m0 / T::kBlockM), tid);
      }
      wgmma_wait<0>();
      fence_regs(dq);
      fence_regs(dk_acc);
      fence_regs(dv_acc);
      // fragment order of the portable kernel's dQ buffer (flash_bwd_prep.cu,
      // DqAccumLayout with block_m 64, mrep 1, cols 64, warps_m 4)
      float* tile = dq_accum + (stats + m0) * kHeadDim;
      if constexpr (kDeterministic) turn.wait(flag, seen, wg, tid);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        red_add_f32x4(tile + ((warp + dq_cb * 4) * 8 + j) * 128 + lane * 4, dq[j]);
      }
    } else {
      wgmma_wait<0>();
      fence_regs(dk_acc);
      fence_regs(dv_acc);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.qdo_empty(st));
  }

  if constexpr (kDeterministic) turn.pass_pending(wg, tid);

  // ---- epilogue: dK * scale and dV, from registers (dropout: dV / (1 - p)) ----
  if (kv_splits > 1) {  // partial sums; the conversion pass scales them
    const i64 tile = ((i64(batch) * gridDim.y / kv_splits + kv_head) * (gridDim.x * 2) +
                      n_block * 2 + wg) * 64 * kHeadDim;
    add_dkv_partial(dk_acc, dv_acc, dk_accum + tile, dv_accum + tile, 0, warp, lane);
    return;
  }
  // (the sequence's first key is read again here rather than held across the loop)
  const SeqLens at = SeqLens::get(cu_seqlens_q, cu_seqlens_k, batch, 0, 0);
  const int b = at.packed ? 0 : batch;
  store_dkv<T::kIsBf16>(
      dk_acc, dv_acc,
      dk + i64(b) * dk_batch_stride + i64(kv_head) * dk_head_stride + at.k_start * dk_row_stride,
      dv + i64(b) * dv_batch_stride + i64(kv_head) * dv_head_stride + at.k_start * dv_row_stride,
      dk_row_stride, dv_row_stride, key_row0, seqlen_k, 0, head_dim, scale,
      kDropout && dropout_threshold != 0u ? dropout_scale : 1.f, lane);
}

// The backward at head dim 256: the dK and dV of 64 keys take 256 registers a thread in
// one warpgroup, so a block owns 64 keys and its two consumer warpgroups split their
// columns. Per query tile of 64 rows, warpgroup w:
//   S^T, dP^T of all 64 keys x its 32 queries (32 w ..)    wgmma, m64n32, from shared memory
//   P^T, dS^T of those, in float32 (options, dropout as in flash_bwd_sm90_kernel); both,
//   in 16 bits, to shared memory
//   (named barrier: both warpgroups' halves in place)
//   dV[:, 128 w ..] += P^T dO[:, 128 w ..]                  wgmma, A and B in shared memory
//   dK[:, 128 w ..] += dS^T Q[:, 128 w ..]
//   dQ[:, 128 w ..]  = dS K[:, 128 w ..], added to the float32 buffer by atomics
//   (deterministic: in turns, DqTurn, a flag per warpgroup's column half)
// The arguments, the producer and the block's tiles are those of flash_bwd_sm90_kernel.
template <class Elem, int kHeadDim, bool kCausal, bool kOptions, bool kDropout,
          bool kDeterministic>
__global__ void __launch_bounds__(384, 1)
    flash_bwd_sm90_wide_kernel(const __grid_constant__ TensorMap tm_q,
                               const __grid_constant__ TensorMap tm_k,
                               const __grid_constant__ TensorMap tm_v,
                               const __grid_constant__ TensorMap tm_do,
                               const float* __restrict__ lse_log2,
                               const float* __restrict__ delta, float* __restrict__ dq_accum,
                               u16* __restrict__ dk, u16* __restrict__ dv, i64 dk_batch_stride,
                               i64 dk_head_stride, i64 dk_row_stride, i64 dv_batch_stride,
                               i64 dv_head_stride, i64 dv_row_stride,
                               float* __restrict__ dk_accum, float* __restrict__ dv_accum,
                               int kv_splits, int seqlen_q, int seqlen_k, int seqlen_q_pad,
                               int num_heads_q, int head_dim, int heads_per_kv,
                               float scale_log2, float scale, int window_left,
                               int window_right, float softcap_in, float softcap_out,
                               const float* __restrict__ alibi_slopes, i64 alibi_batch_stride,
                               u32 dropout_threshold, float dropout_scale, u64 dropout_seed,
                               u32 dropout_bh0, const int* __restrict__ cu_seqlens_q,
                               const int* __restrict__ cu_seqlens_k, int* __restrict__ dq_sem) {
  static_assert(!kDropout || kOptions, "the dropout kernels are options kernels");
  using T = BwdTraits<Elem, kHeadDim>;
  static_assert(T::kWide, "head dims up to 128: flash_bwd_sm90_kernel");
  constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  constexpr int kHalf = kHeadDim / 2;  // dK, dV and dQ columns a warpgroup
  static_assert(regs_split_fits(2, kConsumerRegs, kProducerRegs),
                "setmaxnreg: the consumers take more registers than the producer frees");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const BwdSmem<T> sm{(smem_addr(smem_raw) + 1023u) & ~1023u};
  check_dynamic_smem(T::kSmemBytes);  // the host's launch (Sm90BwdSpec.smem_bytes) agrees
  // (the deterministic mode launches the last key tile first: DqTurn)
  const int n_block = kDeterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const BwdBlock<T, kCausal, kOptions> blk(n_block, kv_splits, heads_per_kv, num_heads_q,
                                           seqlen_q, seqlen_k, seqlen_q_pad, window_left,
                                           window_right, cu_seqlens_q, cu_seqlens_k);
  if (!blk.has_keys) return;  // packed: a shorter sequence
  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) init_bwd_barriers(sm);
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer ----
    regs_dealloc<kProducerRegs>();
    if (threadIdx.x == 0 && blk.steps > 0) {
      produce_steps<T>(sm, tm_q, tm_k, tm_v, tm_do, lse_log2, delta, blk.seq, blk.n0,
                       blk.kv_head, blk.tm_batch, blk.head0, blk.m_begin, blk.m_end, blk.steps,
                       blk.stats0, seqlen_q_pad);
    }
    return;
  }

  // ---- consumers: all 64 keys; 32 queries of a step, and half the columns, a warpgroup ----
  regs_alloc<kConsumerRegs>();
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x - 128 * warpgroup;
  const int lane = tid & 31, warp = tid >> 5;
  const int q_half = 32 * wg;  // this warpgroup's queries of a step
  const int n0 = blk.n0, m_rows = blk.m_end - blk.m_begin;
  const int key0 = n0 + warp * 16;  // this warp's first key
  DqTurn turn = blk.dq_turn(dq_sem, n_block);

  float dk_acc[kHalf / 8][4], dv_acc[kHalf / 8][4];  // columns kHalf * wg ..
#pragma unroll
  for (int j = 0; j < kHalf / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[j][e] = dv_acc[j][e] = 0.f;

  if (blk.steps > 0) mbar_wait(sm.kv_full(), 0);
  for (int it = 0; it < blk.steps; ++it) {
    const int st = it % T::kStages;
    const int head = blk.head0 + it / m_rows;
    const int m0 = (blk.m_begin + it % m_rows) * T::kBlockM;
    const i64 stats = blk.stats0 + i64(head) * seqlen_q_pad;
    mbar_wait(sm.qdo_full(st), (it / T::kStages) & 1);

    // S^T = K Q_i^T and dP^T = V dO_i^T: 64 keys x this warpgroup's 32 queries
    float s[4][4], dp[4][4];
    const auto dropout = Dropout<kDropout>::make(
        dropout_threshold, dropout_seed, dropout_bh0 + u32(blk.batch) * num_heads_q + u32(head));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const u32 col = (kk / 4) * T::kBlockN * 128 + (kk % 4) * 32;
      const u32 qcol = (kk / 4) * T::kBlockM * 128 + q_half * 128 + (kk % 4) * 32;
      wgmma_ss<32, T::kIsBf16>(s, smem_desc(sm.k() + col, 16), smem_desc(sm.q(st) + qcol, 16),
                               kk > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const u32 col = (kk / 4) * T::kBlockN * 128 + (kk % 4) * 32;
      const u32 qcol = (kk / 4) * T::kBlockM * 128 + q_half * 128 + (kk % 4) * 32;
      wgmma_ss<32, T::kIsBf16>(dp, smem_desc(sm.v() + col, 16),
                               smem_desc(sm.dout(st) + qcol, 16), kk > 0);
    }
    wgmma_commit();
    u32 keep = 0u;  // kDropout: the keep mask, computed while S^T is on the tensor cores
    if constexpr (kDropout) {
      if (dropout.active()) {
        keep = dropout.template keep_bits_transposed<1, 4>(key0, m0 + q_half, lane);
      }
    }
    wgmma_wait<1>();
    fence_regs(s);

    // P^T = exp2(S^T scale log2 e - lse log2 e); hidden keys and padded queries give 0
    u32 pf[2][4];
    if constexpr (kOptions) {
      const float slope =
          alibi_slopes ? alibi_slopes[blk.batch * alibi_batch_stride + head] : 0.f;
      const auto scores = ScoreMod<true>::make(scale_log2, softcap_in, softcap_out, slope,
                                               blk.mask.offset());
      probabilities_with_options<T::kIsBf16, kDropout>(
          s, pf, scores, scale_log2, blk.mask,
          blk.mask.template tile_needs_mask<T::kBlockN, T::kBlockM>(n_block, m0),
          dropout.active(), keep, sm.lse(st) + q_half * 4, key0, m0 + q_half, lane);
    } else {
      const bool masked = n0 + T::kBlockN > blk.seq.seqlen_k ||
                          (kCausal && n0 + T::kBlockN - 1 > m0 + q_half + blk.mask.offset());
      probabilities_masked_or_not<T::kIsBf16, false, false, false>(
          s, pf, ScoreMod<true>{}, scale_log2, blk.mask, masked, false, 0u,
          sm.lse(st) + q_half * 4, key0, m0 + q_half, lane);
    }
    wgmma_wait<0>();
    fence_regs(dp);

    // dS^T = P^T (dP^T - delta), in place of dP^T (dropout: P^T < 0 marks a dropped entry)
    ds_in_place(dp, s, sm.delta(st) + q_half * 4, kDropout && dropout_threshold != 0u,
                dropout_scale, lane);
    // P^T and dS^T of this warpgroup's queries into shared memory (rows: the keys)
    const u32 ds_tile = sm.ds(it & 1), pt_tile = ds_tile + T::kPBytes;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp * 16 + (lane >> 2) + h * 8;
        const int col = q_half + j * 8 + (lane & 3) * 2;
        st_shared_b32(swizzled(pt_tile, row, col), pf[j >> 1][2 * (j & 1) + h]);
        st_shared_b32(swizzled(ds_tile, row, col),
                      pack2<T::kIsBf16>(dp[j][2 * h], dp[j][2 * h + 1]));
      }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both warpgroups' queries in place

    // dQ_i = dS K on this warpgroup's columns (k = the 64 keys; dS^T and K MN-major), first:
    // its atomics then run while dV and dK are on the tensor cores
    float dq[kHalf / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < T::kBlockN / 16; ++kk) {
      wgmma_ss_tt<kHalf, T::kIsBf16>(
          dq, smem_desc(ds_tile + kk * 16 * 128, T::kBlockN * 128),
          smem_desc(sm.k() + wg * (kHalf / 64) * T::kBlockN * 128 + kk * 16 * 128,
                    T::kBlockN * 128),
          kk > 0);
    }
    wgmma_commit();
    // dV += P^T dO_i and dK += dS^T Q_i on this warpgroup's columns (k = the 64 queries;
    // dO_i and Q_i MN-major: their rows are the k dimension)
    const u32 cols = wg * (kHalf / 64) * T::kBlockM * 128;  // its first column block
#pragma unroll
    for (int kk = 0; kk < T::kBlockM / 16; ++kk) {
      wgmma_ss_bt<kHalf, T::kIsBf16>(dv_acc, smem_desc(pt_tile + kk * 32, 16),
                                     smem_desc(sm.dout(st) + cols + kk * 16 * 128,
                                               T::kBlockM * 128),
                                     true);
    }
#pragma unroll
    for (int kk = 0; kk < T::kBlockM / 16; ++kk) {
      wgmma_ss_bt<kHalf, T::kIsBf16>(dk_acc, smem_desc(ds_tile + kk * 32, 16),
                                     smem_desc(sm.q(st) + cols + kk * 16 * 128,
                                               T::kBlockM * 128),
                                     true);
    }
    wgmma_commit();
    int* flag = nullptr;
    int seen = 0;
    if constexpr (kDeterministic) {
      flag = turn.flag(stats + m0, wg);
      seen = turn.peek(flag, turn.must_wait(m0 / T::kBlockM), tid);
    }
    wgmma_wait<1>();  // dQ has landed
    fence_regs(dq);
    // fragment order of the portable kernel's dQ buffer (as flash_bwd_sm90_kernel's)
    float* tile = dq_accum + (stats + m0) * kHeadDim;
    if constexpr (kDeterministic) turn.wait(flag, seen, wg, tid);
#pragma unroll
    for (int j = 0; j < kHalf / 8; ++j) {
      const int cb = wg * (kHalf / 64) + j / 8;  // dQ's 64-column block
      red_add_f32x4(tile + ((warp + cb * 4) * 8 + j % 8) * 128 + lane * 4, dq[j]);
    }
    wgmma_wait<0>();
    fence_regs(dk_acc);
    fence_regs(dv_acc);
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.qdo_empty(st));
  }

  if constexpr (kDeterministic) turn.pass_pending(wg, tid);

  // ---- epilogue: dK * scale and dV, from registers (dropout: dV / (1 - p)) ----
  if (kv_splits > 1) {  // partial sums; the conversion pass scales them
    const i64 tile =
        ((i64(blk.batch) * gridDim.y / kv_splits + blk.kv_head) * gridDim.x + n_block) * 64 *
        kHeadDim;
    add_dkv_partial(dk_acc, dv_acc, dk_accum + tile, dv_accum + tile, wg * (kHalf / 8), warp,
                    lane);
    return;
  }
  const i64 row0 = blk.seq.k_start;
  store_dkv<T::kIsBf16>(
      dk_acc, dv_acc,
      dk + i64(blk.tm_batch) * dk_batch_stride + i64(blk.kv_head) * dk_head_stride +
          row0 * dk_row_stride,
      dv + i64(blk.tm_batch) * dv_batch_stride + i64(blk.kv_head) * dv_head_stride +
          row0 * dv_row_stride,
      dk_row_stride, dv_row_stride, key0 + (lane >> 2), blk.seq.seqlen_k, wg * (kHalf / 8),
      head_dim, scale, kDropout && dropout_threshold != 0u ? dropout_scale : 1.f, lane);
}

}  // namespace sm90
}  // namespace cuflash
