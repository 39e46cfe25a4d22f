// cuflash: shared device helpers for the attention kernels.
//
// The kernels include no CUDA header at all: NVRTC from pip ships without
// cuda_fp16.h, so 16-bit values travel as raw bits (uint16_t / packed uint32_t)
// and every conversion, matrix instruction and async copy is inline PTX.
// Requires sm_80 or newer (mma.sync m16n8k16 / m16n8k8 tf32, ldmatrix, cp.async).
//
// Global arrays are addressed in 16-bit units whatever the element type: a float32
// element is two units, and the host passes strides (and the head dims that bound the
// tile copies) in units, so the copies move bytes and need no element type.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define CUFLASH_DEVICE __device__ __forceinline__

namespace cuflash {

// Operand precisions of the tensor-core products (template argument kPrec).
constexpr int kPrecF16 = 0;   // fp16 operands, m16n8k16
constexpr int kPrecBF16 = 1;  // bf16 operands, m16n8k16
constexpr int kPrecTF32 = 2;  // float32 storage, operands rounded to tf32, m16n8k8

// Element type tags: storage width in 16-bit units and the products' precision.
struct f16_t {
  static constexpr bool kIsBf16 = false;
  static constexpr int kPrec = kPrecF16;
  static constexpr int kWords = 1;
};
struct bf16_t {
  static constexpr bool kIsBf16 = true;
  static constexpr int kPrec = kPrecBF16;
  static constexpr int kWords = 1;
};
struct f32_t {
  static constexpr bool kIsBf16 = false;
  static constexpr int kPrec = kPrecTF32;
  static constexpr int kWords = 2;
};

// The k extent of one tensor-core step: 16 for 16-bit operands, 8 for tf32. A fragments
// of a k-long operand are arrays [..][k / kKStep<kPrec>][4] of 32-bit registers.
template <int kPrec>
constexpr int kKStep = kPrec == kPrecTF32 ? 8 : 16;

template <bool kValue>
struct BoolConst {
  static constexpr bool value = kValue;
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// threadIdx.x, read afresh (volatile): addresses derived from it are then recomputed
// where they are used instead of being hoisted out of a loop and held in registers (or
// spilled) for its whole length.
CUFLASH_DEVICE int thread_index() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  return tid;
}

// blockIdx.{x,y,z} (kDim 0, 1, 2), read afresh in the same way.
template <int kDim>
CUFLASH_DEVICE int block_index() {
  int v;
  if (kDim == 0) asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  if (kDim == 1) asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(v));
  if (kDim == 2) asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(v));
  return v;
}

CUFLASH_DEVICE float neg_inf() { return __int_as_float(0xff800000); }
CUFLASH_DEVICE float pos_inf() { return __int_as_float(0x7f800000); }

// ---------------------------------------------------------------------------
// Conversions.
// ---------------------------------------------------------------------------

// Packs (lo, hi) into two 16-bit values, rounded to nearest; `lo` in bits 0..15.
template <bool kIsBf16>
CUFLASH_DEVICE u32 pack2(float lo, float hi) {
  u32 r;
  if (kIsBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

// Inverse of pack2.
template <bool kIsBf16>
CUFLASH_DEVICE void unpack2(u32 x, float& lo, float& hi) {
  if (kIsBf16) {
    lo = __uint_as_float(x << 16);
    hi = __uint_as_float(x & 0xffff0000u);
  } else {
    asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;}\n"
        : "=f"(lo), "=f"(hi)
        : "r"(x));
  }
}

// Two floats kept for a later step of the same thread: fp16 halves of one register, or
// (kWide) two float registers, for float32 inputs, whose products round to tf32 (as many
// significant bits as fp16), so that one more rounding would double their error.
template <bool kWide>
struct FloatPair {
  u32 bits;
  CUFLASH_DEVICE void set(float lo, float hi) { bits = pack2<false>(lo, hi); }
  CUFLASH_DEVICE void get(float& lo, float& hi) const { unpack2<false>(bits, lo, hi); }
};
template <>
struct FloatPair<true> {
  float lo_, hi_;
  CUFLASH_DEVICE void set(float lo, float hi) { lo_ = lo, hi_ = hi; }
  CUFLASH_DEVICE void get(float& lo, float& hi) const { lo = lo_, hi = hi_; }
};

template <bool kIsBf16>
CUFLASH_DEVICE float to_float(u16 x) {
  if (kIsBf16) {
    return __uint_as_float(u32(x) << 16);
  } else {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
}

template <bool kIsBf16>
CUFLASH_DEVICE u16 from_float(float f) {
  u16 r;
  if (kIsBf16) {
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  } else {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  }
  return r;
}

// float32 -> tf32 (10 explicit mantissa bits), rounded to nearest, ties away; as raw bits.
CUFLASH_DEVICE u32 to_tf32(float x) {
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

CUFLASH_DEVICE int lane_id() {
  int lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

// 2^x on the special-function unit (the online softmax works in base 2).
CUFLASH_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

CUFLASH_DEVICE float log2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------
// Tensor cores: D = A * B + D, m16n8k16, fp32 accumulation.
// A: 4 regs (16x16, row major), B: 2 regs (16x8, "col" = n-major), C/D: 4 floats.
// ---------------------------------------------------------------------------
template <bool kIsBf16>
CUFLASH_DEVICE void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if (kIsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// D = A * B + D, m16n8k8 with tf32 operands (fp32 bits, already rounded: to_tf32).
// A: 4 regs (rows g, g + 8 x k t, t + 4), B: 2 regs (k t, t + 4 x column g).
CUFLASH_DEVICE void mma_1688_tf32(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One tensor-core step of precision kPrec (k = kKStep<kPrec>).
template <int kPrec>
CUFLASH_DEVICE void mma_step(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if (kPrec == kPrecTF32) {
    mma_1688_tf32(d, a, b0, b1);
  } else {
    mma_16816<kPrec == kPrecBF16>(d, a, b0, b1);
  }
}

// ---------------------------------------------------------------------------
// Shared memory: addresses, ldmatrix, plain stores.
// ---------------------------------------------------------------------------
CUFLASH_DEVICE u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

CUFLASH_DEVICE void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

CUFLASH_DEVICE void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

CUFLASH_DEVICE void st_shared_b32(u32 addr, u32 v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v));
}

CUFLASH_DEVICE void st_shared_v4(u32 addr, const u32 (&v)[4]) {
  asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(v[0]), "r"(v[1]),
               "r"(v[2]), "r"(v[3]));
}

CUFLASH_DEVICE void ld_shared_v4(u32 (&v)[4], u32 addr) {
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
               : "r"(addr));
}

CUFLASH_DEVICE u32 ld_shared_b32(u32 addr) {
  u32 v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

CUFLASH_DEVICE void st_shared_v2(u32 addr, u32 x, u32 y) {
  asm volatile("st.shared.v2.b32 [%0], {%1,%2};\n" ::"r"(addr), "r"(x), "r"(y));
}

CUFLASH_DEVICE void ld_shared_f2(float& x, float& y, u32 addr) {
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(x), "=f"(y) : "r"(addr));
}

// ---------------------------------------------------------------------------
// Float atomics in global memory, result unused (red): one 8-byte pair.
// ---------------------------------------------------------------------------
CUFLASH_DEVICE void red_add_f32x2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1,%2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(a) : "memory");
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p + 1), "f"(b) : "memory");
#endif
}

// Four consecutive floats (16-byte aligned).
CUFLASH_DEVICE void red_add_f32x4(float* p, const float (&v)[4]) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1,%2,%3,%4};\n" ::"l"(p), "f"(v[0]), "f"(v[1]),
               "f"(v[2]), "f"(v[3])
               : "memory");
#else
  red_add_f32x2(p, v[0], v[1]);
  red_add_f32x2(p + 2, v[2], v[3]);
#endif
}

// ---------------------------------------------------------------------------
// Asynchronous global -> shared copies (16 bytes, zero-filled when !pred).
// ---------------------------------------------------------------------------
CUFLASH_DEVICE void cp_async_16(u32 dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

CUFLASH_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
CUFLASH_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---------------------------------------------------------------------------
// Quad reductions: the four lanes that share an mma row (lane / 4 equal).
// ---------------------------------------------------------------------------
CUFLASH_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

CUFLASH_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

}  // namespace cuflash
