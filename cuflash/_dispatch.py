"""GPU dispatch: pick the specialisation, compile it once (NVRTC via CuPy), launch it.

Input checking is done by :mod:`cuflash._api`; this module trusts its arguments.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import _kernels

_MAX_GRID_YZ = 65535
_ATTR_MAX_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin

# (spec, device id) -> cupy.RawKernel. One RawModule per specialisation.
_kernel_cache: dict = {}


def _cupy():
    import cupy

    return cupy


def device_arch() -> int:
    """Compute capability of the current device, e.g. 90."""
    return int(_cupy().cuda.Device().compute_capability)


def get_kernel(spec: _kernels.FwdSpec):
    """The compiled kernel for ``spec`` on the current device (compiled on first use)."""
    cp = _cupy()
    dev = cp.cuda.Device().id
    key = (spec, dev)
    kern = _kernel_cache.get(key)
    if kern is None:
        mod = cp.RawModule(code=_kernels.source_text(), options=_kernels.compile_options(),
                           name_expressions=[spec.name_expression])
        kern = mod.get_function(spec.name_expression)
        if spec.smem_bytes > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = spec.smem_bytes
        _kernel_cache[key] = kern
    return kern


def clear_kernel_cache() -> None:
    """Forget the in-memory modules (CuPy's on-disk cache is kept)."""
    _kernel_cache.clear()


def _elem_strides(x) -> tuple[int, ...]:
    # Strides of size-1 dims never move the pointer: report 0 so they pass alignment checks.
    return tuple(0 if n == 1 else s // x.itemsize for n, s in zip(x.shape, x.strides))


def is_vec_aligned(arrays, head_dim: int, head_dim_v: int) -> bool:
    """Whether 16-byte copies are legal: aligned bases, strides and head dims % 8."""
    if head_dim % 8 or head_dim_v % 8:
        return False
    for x in arrays:
        if x.data.ptr % 16:
            return False
        if any(s % 8 for s in _elem_strides(x)[:-1]):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _max_smem_per_block(device_id: int) -> int:
    cp = _cupy()
    return int(cp.cuda.runtime.deviceGetAttribute(_ATTR_MAX_SMEM_OPTIN, device_id))


def max_smem_per_block() -> int:
    """Shared memory a block may opt into on the current device."""
    return _max_smem_per_block(_cupy().cuda.Device().id)


def select_fwd_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, vec: bool,
                    arch: int) -> _kernels.FwdSpec:
    spec = _kernels.fwd_spec(dtype, head_dim, head_dim_v, causal, vec, arch)
    limit = max_smem_per_block()
    if spec.smem_bytes > limit and spec.tile.stages == 2:
        # Smaller parts (sm_86/sm_89: 99 KB) get FlashAttention-2's single-stage schedule.
        t = spec.tile
        spec = _kernels.fwd_spec(dtype, head_dim, head_dim_v, causal, vec, arch,
                                 tile=_kernels.FwdTile(t.block_m, t.block_n, t.num_warps, 1, 1))
    if spec.smem_bytes > limit:
        raise RuntimeError(f"{spec.label} needs {spec.smem_bytes} bytes of shared memory; "
                           f"this device allows {limit}")
    return spec


def forward(q, k, v, out, lse, *, causal: bool, scale: float, spec=None) -> None:
    """Launch the forward kernel on 4-D views ``(B, H, L, D)``; lse is ``(B, Hq, Lq)``.

    ``out`` and ``lse`` are written in full (every row of every head).
    """
    cp = _cupy()
    B, Hq, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if B == 0 or Hq == 0 or Lq == 0:
        return
    if spec is None:
        vec = is_vec_aligned((q, k, v, out), D, Dv)
        spec = select_fwd_spec(_dtype_name(q.dtype), D, Dv, causal, vec, device_arch())
    kern = get_kernel(spec)
    qs, ks, vs, os_ = (_elem_strides(x) for x in (q, k, v, out))
    ls = tuple(s // 4 for s in lse.strides)
    grid_m = math.ceil(Lq / spec.tile.block_m)
    for b0 in range(0, B, _MAX_GRID_YZ):
        nb = min(_MAX_GRID_YZ, B - b0)
        args = (
            q[b0:], k[b0:], v[b0:], out[b0:], lse[b0:],
            np.int64(qs[0]), np.int64(qs[1]), np.int64(qs[2]),
            np.int64(ks[0]), np.int64(ks[1]), np.int64(ks[2]),
            np.int64(vs[0]), np.int64(vs[1]), np.int64(vs[2]),
            np.int64(os_[0]), np.int64(os_[1]), np.int64(os_[2]),
            np.int64(ls[0]), np.int64(ls[1]),
            np.int32(Lq), np.int32(Lk), np.int32(D), np.int32(Dv), np.int32(Hq // Hk),
            np.float32(scale * math.log2(math.e)),
        )
        kern((grid_m, Hq, nb), (spec.threads, 1, 1), args, shared_mem=spec.smem_bytes)


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _kernels.DTYPES:
        raise TypeError(f"no GPU kernel for dtype {name}")
    return name
