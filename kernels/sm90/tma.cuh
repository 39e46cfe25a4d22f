// cuflash: the copy engine (TMA) and shared-memory barriers (mbarrier), sm_90.
//
// A tile load is one cp.async.bulk.tensor per 64-column block of the tile, described by a
// tensor map that the host encodes (cuflash/_sm90.py) over a 4-D view (columns, rows,
// heads, batch) with 128-byte swizzling; rows past the end of the view arrive as zeros.
// The load completes on an mbarrier that expects the tile's bytes.
#pragma once
#include "../common.cuh"

namespace cuflash {
namespace sm90 {

// The host's CUtensorMap, passed by value as a __grid_constant__ kernel parameter.
struct alignas(64) TensorMap {
  u64 bits[16];
};

CUFLASH_DEVICE void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}

// Makes the initialised barriers visible to the copy engine and to the other threads
// (a block-wide barrier follows).
CUFLASH_DEVICE void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// One arrival that also announces `bytes` of copies to come.
CUFLASH_DEVICE void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

CUFLASH_DEVICE void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits until the phase of parity `parity` has completed. A fresh barrier counts its
// (nonexistent) phase of parity 1 as completed, so producers start waiting on parity 1.
CUFLASH_DEVICE void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "CUFLASH_WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra CUFLASH_WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// One box (64 columns x box rows) at (col, row, head, batch) into `dst`, completing on `bar`.
CUFLASH_DEVICE void tma_load_4d(u32 dst, const TensorMap& map, u32 bar, int col, int row,
                                int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<u64>(&map)), "r"(bar), "r"(col), "r"(row), "r"(head), "r"(batch)
      : "memory");
}

// `rows` rows of a tile at (row0, head, batch): one box per 64-column block, each landing
// as `rows` x 128 bytes at dst + c * rows * 128.
template <int kColBlocks>
CUFLASH_DEVICE void load_rows(u32 dst, const TensorMap& map, u32 bar, int rows, int row0,
                              int head, int batch) {
#pragma unroll
  for (int c = 0; c < kColBlocks; ++c) {
    tma_load_4d(dst + c * rows * 128, map, bar, c * 64, row0, head, batch);
  }
}

// `bytes` contiguous bytes (a multiple of 16, both addresses 16-byte aligned) from global
// memory into `dst`, completing on `bar`.
CUFLASH_DEVICE void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(reinterpret_cast<u64>(src)), "r"(bytes), "r"(bar)
      : "memory");
}

CUFLASH_DEVICE void prefetch_tensor_map(const TensorMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(&map)) : "memory");
}

// Traps unless the launch gave at least `bytes` of dynamic shared memory: the kernel's
// layout and the host's launch size (cuflash/_kernels.py) are written twice, and a
// mismatch must fail loudly rather than overlap the last buffers.
CUFLASH_DEVICE void check_dynamic_smem(u32 bytes) {
  u32 dynamic_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dynamic_bytes));
  if (dynamic_bytes < bytes) __trap();
}

// Register reallocation between warpgroups (the kernel needs a register cap at entry).
template <int kRegs>
CUFLASH_DEVICE void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
CUFLASH_DEVICE void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Whether one producer warpgroup at producer_regs a thread frees enough for `consumers`
// warpgroups at consumer_regs: setmaxnreg only moves registers within the block's launch
// allocation (64k / threads, in eights), and an increase that nobody frees waits forever.
__device__ constexpr bool regs_split_fits(int consumers, int consumer_regs, int producer_regs) {
  const int launch_regs = 65536 / (128 * (consumers + 1)) / 8 * 8;  // a thread's, at launch
  return consumers * (consumer_regs - launch_regs) <= launch_regs - producer_regs;
}

}  // namespace sm90
}  // namespace cuflash
