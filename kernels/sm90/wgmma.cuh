// cuflash: warpgroup matrix products (wgmma, sm_90a) -- shared-memory descriptors and the
// ordering instructions around the asynchronous products of wgmma_ops.cuh.
//
// Tiles live in shared memory as the copy engine writes them with 128-byte swizzling
// (tma.cuh): a tile of R rows x C 16-bit columns is C/64 column blocks, each R rows of
// 128 bytes, whose 16-byte chunks are permuted within each 8-row, 1024-byte group. Every
// column block starts on a 1024-byte boundary.
#pragma once
#include "../common.cuh"
#include "wgmma_ops.cuh"

namespace cuflash {
namespace sm90 {

// Matrix descriptor of a 128-byte-swizzled operand at shared address `addr`:
//   bits  0-13  start address / 16
//   bits 16-29  leading byte offset / 16: K-major, unused (1); MN-major, the distance
//               between 64-element column blocks along N
//   bits 32-45  stride byte offset / 16: the distance between 8-row groups (1024 bytes)
//   bits 62-63  swizzle mode, 1 = 128 bytes
// A K-major operand of 16 columns at column k of a block starts at addr + 2k bytes: the
// hardware applies the swizzle to the address it forms, as the copy engine did.
CUFLASH_DEVICE u64 smem_desc(u32 addr, u32 leading_bytes) {
  return u64((addr & 0x3ffff) >> 4) | (u64(leading_bytes >> 4) << 16) | (u64(1024 >> 4) << 32) |
         (u64(1) << 62);
}

// Before the first wgmma of a batch: orders the registers' earlier writes (the rescaled
// accumulators, P) before the asynchronous products read them.
CUFLASH_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
CUFLASH_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
CUFLASH_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads or writes of the accumulators across the
// asynchronous product (they are written by the tensor cores, not by the asm statement).
template <int kRows>
CUFLASH_DEVICE void fence_regs(float (&d)[kRows][4]) {
#pragma unroll
  for (int j = 0; j < kRows; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}
template <int kRows>
CUFLASH_DEVICE void fence_regs(u32 (&a)[kRows][4]) {
#pragma unroll
  for (int j = 0; j < kRows; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}

}  // namespace sm90
}  // namespace cuflash
