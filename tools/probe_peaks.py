"""Ceilings of the card for the portable kernels: mma.sync m16n8k16 (bf16, fp32 accumulate)
and ldmatrix.x4 shared-memory throughput, from micro-kernels that do nothing else.

    PYTHONPATH=. python3 tools/probe_peaks.py

docs/perf-log.md compares the attention kernels' rates with these.
"""

import cupy as cp

SRC = r"""
#include "common.cuh"
using namespace cuflash;

// Each warp: kChains independent accumulators, kIters rounds of mma.sync.
extern "C" __global__ void __launch_bounds__(256) mma_peak(float* out, int iters) {
  u32 a[4] = {threadIdx.x, threadIdx.x * 3u, threadIdx.x * 5u, threadIdx.x * 7u};
  float acc[8][4] = {};
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int c = 0; c < 8; ++c) mma_16816<true>(acc[c], a, a[c & 3], a[(c + 1) & 3]);
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < 8; ++c) s += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
  if (s == 1234.5f) out[threadIdx.x] = s;
}

// Each warp: ldmatrix.x4 from conflict-free rows of a 16 KB buffer.
extern "C" __global__ void __launch_bounds__(256) ldsm_peak(u32* out, int iters) {
  __shared__ __align__(16) unsigned char buf[16384];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < 16384 / 4; i += blockDim.x) reinterpret_cast<u32*>(buf)[i] = i;
  __syncthreads();
  const u32 base = smem_addr(buf) + warp * 2048 + lane * 16;
  u32 x = 0;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      u32 r[4];
      ldmatrix_x4(r, base + ((c * 512 + it * 16) & 1535));
      x ^= r[0] ^ r[1] ^ r[2] ^ r[3];
    }
  }
  if (x == 0x12345678u) out[threadIdx.x] = x;
}
"""


def main():
    from cuflash import _kernels

    mod = cp.RawModule(code=SRC, options=("-std=c++17", f"-I{_kernels.kernel_dir()}"))
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    clock_khz = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrClockRate, dev.id)
    out = cp.zeros(1024, dtype=cp.float32)
    start, stop = cp.cuda.Event(), cp.cuda.Event()

    def timed(kern, blocks, iters):
        kern((blocks,), (256,), (out, cp.int32(iters)))
        start.record()
        kern((blocks,), (256,), (out, cp.int32(iters)))
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) * 1e-3

    iters = 20000
    for per_sm in (1, 2):
        blocks = sms * per_sm
        t = timed(mod.get_function("mma_peak"), blocks, iters)
        flops = blocks * 8 * iters * 8 * 2 * 16 * 8 * 16
        print(f"mma.sync bf16 m16n8k16, {per_sm * 8} warps/SM: {flops / t / 1e12:7.1f} TFLOP/s")
        t = timed(mod.get_function("ldsm_peak"), blocks, iters)
        nbytes = blocks * 8 * iters * 4 * 512
        per_clk = nbytes / t / (sms * clock_khz * 1e3)
        print(f"ldmatrix.x4, {per_sm * 8} warps/SM: {nbytes / t / 1e12:7.2f} TB/s, "
              f"{per_clk:6.1f} B/clk/SM (at the {clock_khz / 1e6:.2f} GHz base clock attribute)")


if __name__ == "__main__":
    main()
