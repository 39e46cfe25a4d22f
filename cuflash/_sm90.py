"""Hopper (sm_90a) dispatch: the wgmma/TMA forward and backward kernels
(kernels/flash_fwd_sm90.cu, kernels/flash_bwd_sm90.cu).

The kernel reads Q, K and V through tensor maps (the copy engine's descriptors), which the
host encodes here with ``cuda.bindings`` and passes by value. Its module is compiled for
``sm_90a`` by :mod:`cuflash._nvrtc` (CuPy's own compile can only name plain ``sm_90``) and
loaded from the cubin.

The kernels take the score options (window, softcap, ALiBi), dropout, GQA, packed
sequences and, in the backward pass, the deterministic mode. Calls that they do not cover
run the portable kernels: other devices, float32, head dims that are not a whole number
of 16-byte rows, Dv != D, views whose strides or base addresses the copy engine cannot
take (16-byte multiples). Head dims above 128 run a backward kernel of their own (64 keys a
block, ``Sm90BwdSpec.wide``).
``CUFLASH_SM90=0`` turns this path off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ctypes
import functools
import hashlib
import math
import os
from pathlib import Path

import numpy as np

from . import _kernels, _nvrtc

_MAX_GRID_YZ = 65535
_MAX_TILES = (1 << 31) - (1 << 20)  # the forward's tile indices (int32) with room above
_TENSOR_MAP = np.dtype((np.void, 128))

#: Set False to run the portable kernels on Hopper too (tests and benchmarks compare them).
enabled = os.environ.get("CUFLASH_SM90", "1") != "0"


@contextlib.contextmanager
def disabled():
    """The portable kernels only, while inside (benchmarks set the two families side by
    side)."""
    global enabled
    saved, enabled = enabled, False
    try:
        yield
    finally:
        enabled = saved


@functools.lru_cache(maxsize=None)
def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return driver


@functools.lru_cache(maxsize=None)
def _can_compile() -> bool:
    try:
        _nvrtc.version()
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def available(arch: int) -> bool:
    """Whether this process can run the sm_90a kernels on a device of ``arch``: it needs
    ``cuda-bindings`` (tensor maps) and NVRTC through ``cuda-pathfinder``."""
    return enabled and arch == 90 and _driver() is not None and _can_compile()


def fwd_spec_for(q, k, v, out, *, causal: bool, scale: float, options_kernel: bool,
                 dropout_kernel: bool, packed) -> object:
    """The sm_90a forward spec for this call, or None where the portable kernel runs."""
    if not scale > 0:
        return None
    B, H, Lq, D = q.shape
    if v.shape[3] != D or not _grid_ok(q, k, packed):
        return None
    spec = _kernels.sm90_fwd_spec(np.dtype(q.dtype).name, D, causal, options_kernel,
                                  dropout_kernel)
    if spec is None or D % 8:
        return None
    if packed is not None:
        B, Lq, Lk = packed.batch, packed.max_seqlen_q, packed.max_seqlen_k
    else:
        Lk = k.shape[2]
    # persistent blocks (their tile indices counted with the tile that runs)
    key_tiles = math.ceil(Lk / spec.tile.block_n)
    if FWD_PERSISTENT and (FWD_PERSISTENT_MAX_KEY_TILES is None
                           or key_tiles <= FWD_PERSISTENT_MAX_KEY_TILES):
        walker = dataclasses.replace(
            spec, persistent=True,
            tile=_kernels.sm90_persistent_fwd_tile(spec.head_dim, key_tiles, spec.causal))
        if math.ceil(Lq / walker.tile.block_m) * H * B < _MAX_TILES:
            spec = walker
    if not _tma_ready(q, k, v) or not _pair_writable(out):
        return None
    return spec


def _grid_ok(q, k, packed=None) -> bool:
    """Non-empty arrays (a tensor map has no empty dims) and grid dims in range (packed:
    one grid row per sequence)."""
    B, H, Lq, _ = q.shape
    if packed is not None:
        B = packed.batch
    return 0 < B <= _MAX_GRID_YZ and 0 < H <= _MAX_GRID_YZ and Lq > 0 and k.shape[2] > 0


_MAX_STRIDE = 1 << 40  # the copy engine's limit on a tensor map's byte strides


def _tma_ready(*arrays) -> bool:
    """Whether the copy engine can read these (B, H, L, D) views: 16-byte aligned bases,
    contiguous rows, 16-byte strides."""
    for x in arrays:
        if x.data.ptr % 16 or x.strides[3] != 2:
            return False
        if any(s % 16 or not 0 < s < _MAX_STRIDE
               for n, s in zip(x.shape[:3], x.strides[:3]) if n > 1):
            return False
    return True


def _pair_writable(*arrays) -> bool:
    """Whether the epilogues' 4-byte stores of element pairs are aligned in these views."""
    return all(x.data.ptr % 4 == 0 and x.strides[3] == 2 and not any(s % 4 for s in x.strides[:3])
               for x in arrays)


def bwd_spec_for(q, k, v, dout, dk, dv, *, causal: bool, scale: float, options_kernel: bool,
                 dropout_kernel: bool, packed, deterministic: bool) -> object:
    """The sm_90a backward spec for this call, or None where the portable kernels run.
    ``deterministic``: the kernel then adds to each dQ tile in a fixed order (dQ
    semaphores, :func:`backward_main`), and GQA groups are not split (:func:`kv_splits`)."""
    if not scale > 0:
        return None
    B, H, Lq, D = q.shape
    if v.shape[3] != D or not _grid_ok(q, k, packed) or D % 8:
        return None
    spec = _kernels.sm90_bwd_spec(np.dtype(q.dtype).name, D, causal, options_kernel,
                                  dropout_kernel, deterministic)
    if spec is None or not _tma_ready(q, k, v, dout) or not _pair_writable(dk, dv):
        return None
    return spec


#: Blocks a backward launch should have before GQA groups are split over several (the
#: kernel walks every query head of a group otherwise: few, long blocks balance badly).
_BWD_MIN_BLOCKS_PER_SM = 8


def kv_splits(spec, q, k, packed=None) -> int:
    """Blocks per (key tile, kv head) of the backward: the smallest divisor of the group
    size that gives the launch ``_BWD_MIN_BLOCKS_PER_SM`` blocks per SM (1 without GQA,
    for packed sequences, and in the deterministic mode, whose dK and dV must not be sums
    of atomics)."""
    if packed is not None or spec.deterministic:
        return 1
    B, Hq = q.shape[:2]
    Hk, Lk = k.shape[1], k.shape[2]
    group = Hq // Hk
    blocks = math.ceil(Lk / spec.block_n) * Hk * B
    target = _BWD_MIN_BLOCKS_PER_SM * _sm_count()
    for d in range(1, group + 1):
        if group % d == 0 and (blocks * d >= target or d == group):
            return d
    return 1


def dq_sem_size(stats_rows: int) -> int:
    """int32 entries of the deterministic mode's dQ turns: one per 64-row tile of the
    statistics (``stats_rows`` rows in all, a multiple of 64) and warpgroup's share of dQ's
    columns (a 64-column block, or a half in the wide kernel)."""
    return stats_rows // 64 * 2


def dkv_accum_rows(spec, k) -> int:
    """Rows per (batch, kv head) of the float32 dK/dV partial sums of a split launch."""
    return math.ceil(k.shape[2] / spec.block_n) * spec.block_n


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _sm_count() -> int:
    import cupy

    return _sm_count_of(cupy.cuda.Device().id)


def backward_main(spec, q, k, v, dout, lse_log2, delta, dq_accum, dk, dv, *,
                  seqlen_q_pad: int, scale: float, option_args: tuple, splits: int = 1,
                  dk_accum=None, dv_accum=None, packed=None, dq_sem=None) -> None:
    """Launch the sm_90a backward kernel: dK and dV written, dQ added to ``dq_accum``
    (float32, zeroed, in ``spec.dq_layout`` fragment order); lse_log2 and delta from the
    portable preprocess kernel; ``option_args`` as in :func:`forward`. With ``splits`` > 1
    (:func:`kv_splits`) dK and dV are instead added, unscaled, to ``dk_accum`` and
    ``dv_accum`` (float32, zeroed, (B, Hk, dkv_accum_rows, head dim) in the same fragment
    order), which the caller converts. ``packed`` as in :func:`forward`. ``dq_sem``: the
    deterministic mode's turns, int32 zeros, two per 64 rows of the statistics
    (:func:`dq_sem_size`), for a deterministic ``spec``: its blocks add to each dQ tile in
    key-tile order."""
    if spec.deterministic != (dq_sem is not None):
        raise ValueError("a deterministic sm_90a backward takes dq_sem, the others do not")
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    cu = (np.uint64(0), np.uint64(0))
    if packed is not None:
        B, Lq, Lk = packed.batch, packed.max_seqlen_q, packed.max_seqlen_k
        cu = (packed.cu_seqlens_q, packed.cu_seqlens_k)
    fn = get_function(spec)
    dks, dvs = (tuple(s // 2 for s in x.strides) for x in (dk, dv))
    null = np.uint64(0)
    args = (_encode(q, 64), _encode(k, spec.block_n), _encode(v, spec.block_n),
            _encode(dout, 64), lse_log2, delta, dq_accum, dk, dv,
            *(np.int64(x) for x in (*dks[:3], *dvs[:3])),
            null if dk_accum is None else dk_accum, null if dv_accum is None else dv_accum,
            np.int32(splits), np.int32(Lq), np.int32(Lk),
            np.int32(seqlen_q_pad), np.int32(Hq), np.int32(D), np.int32(Hq // Hk),
            np.float32(scale * math.log2(math.e)), np.float32(scale), *option_args, *cu,
            null if dq_sem is None else dq_sem)
    fn((math.ceil(Lk / spec.block_n), Hk * splits, B), (spec.threads, 1, 1), args,
       shared_mem=spec.smem_bytes)


def _encode(x, rows: int):
    """Tensor map of a (B, H, L, D) view: 4-D (D, L, H, B), boxes of 64 columns x ``rows``
    rows, 128-byte swizzle, zeros past the end of each dim."""
    return _encode_cached(x.data.ptr, x.shape, x.strides, np.dtype(x.dtype).name, rows)


@functools.lru_cache(maxsize=512)
def _encode_cached(ptr: int, shape: tuple, byte_strides: tuple, dtype_name: str, rows: int):
    # (a map holds only the address, shape and strides: one for a reused buffer is valid)
    drv = _driver()
    B, H, L, D = shape
    dims = [D, L, H, B]
    strides = []
    inner = D * 2
    for n, s in zip((L, H, B), (byte_strides[2], byte_strides[1], byte_strides[0])):
        strides.append(s if n > 1 else inner)  # a size-1 dim's stride is never used
        inner = strides[-1] * n
    dtype = (drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
             if dtype_name == "bfloat16"
             else drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
    err, tmap = drv.cuTensorMapEncodeTiled(
        dtype, 4, ptr,
        [drv.cuuint64_t(n) for n in dims],
        [drv.cuuint64_t(s) for s in strides],
        [drv.cuuint32_t(n) for n in (64, rows, 1, 1)],
        [drv.cuuint32_t(1)] * 4,
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for shape {shape}, "
                           f"strides {byte_strides}")
    raw = ctypes.string_at(tmap.getPtr(), 128)
    return np.frombuffer(raw, dtype=_TENSOR_MAP)[0]


_functions: dict = {}


def get_function(spec):
    """The compiled kernel of ``spec`` on the current device (compiled on first use)."""
    import cupy

    dev = cupy.cuda.Device().id
    fn = _functions.get((spec, dev))
    if fn is None:
        cubin, name = _cached_cubin(spec)
        mod = cupy.cuda.function.Module()
        mod.load(cubin)  # (the function holds its module)
        fn = mod.get_function(name)
        cupy.cuda.driver.funcSetAttribute(
            fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            spec.smem_bytes)
        _functions[(spec, dev)] = fn
    return fn


def _cache_dir() -> Path:
    """CuPy's kernel cache folder (``CUPY_CACHE_DIR``, default ~/.cupy/kernel_cache)."""
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def _cached_cubin(spec) -> tuple[bytes, str]:
    """The cubin of ``spec`` and its kernel's lowered name, from the disk cache or compiled
    (then cached). The key covers the spec, the NVRTC options (every kernel source's hash and
    any probe's extra options among them) and the NVRTC version."""
    key = hashlib.sha256(f"{spec.name_expression}|{' '.join(_kernels.compile_options())}|"
                         f"{_nvrtc.version()}".encode()).hexdigest()[:32]
    path = _cache_dir() / f"cuflash_sm90_{key}.cubin"
    try:
        blob = path.read_bytes()
        name, cubin = blob.split(b"\0", 1)
        return cubin, name.decode()
    except (OSError, ValueError):
        pass
    cubin, names = _nvrtc.build_cubin(spec)
    name = names[spec.name_expression]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(name.encode() + b"\0" + cubin)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except OSError:
        pass  # a read-only cache folder only costs a compile per process
    return cubin, name


def forward(spec, q, k, v, out, lse, *, scale: float, option_args: tuple,
            packed=None) -> None:
    """Launch the sm_90a forward kernel ``spec`` (from :func:`fwd_spec_for`) on
    (B, H, L, D) views (lse (B, H, Lq)); ``option_args``: the options' kernel arguments
    (``_dispatch._option_args``), which a plain kernel ignores; ``packed``: packed
    sequences (``_dispatch.Packed``; the views are then (1, H, total, D))."""
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    cu = (np.uint64(0), np.uint64(0))
    if packed is not None:
        B, Lq, Lk = packed.batch, packed.max_seqlen_q, packed.max_seqlen_k
        cu = (packed.cu_seqlens_q, packed.cu_seqlens_k)
    t = spec.tile
    fn = get_function(spec)
    os_ = tuple(s // 2 for s in out.strides)
    ls = tuple(s // 4 for s in lse.strides)
    m_blocks = math.ceil(Lq / t.block_m)
    num_tiles = m_blocks * Hq * B
    if spec.persistent:  # one block a multiprocessor, each taking tiles from a counter
        grid = (min(num_tiles, FWD_MAX_BLOCKS or _sm_count()), 1, 1)
        sched = _tile_counters()
    else:
        grid = (m_blocks, Hq, B)
        sched = np.uint64(0)
    args = (_encode(q, t.block_m), _encode(k, t.block_n), _encode(v, t.block_n), out, lse,
            np.int64(os_[0]), np.int64(os_[1]), np.int64(os_[2]), np.int64(ls[0]),
            np.int64(ls[1]), np.int32(Lq), np.int32(Lk), np.int32(D), np.int32(Hq // Hk),
            np.float32(scale * math.log2(math.e)), *option_args, *cu, np.int32(m_blocks),
            np.int32(Hq), np.int32(num_tiles), sched)
    fn(grid, (spec.threads, 1, 1), args, shared_mem=spec.smem_bytes)


#: The sm_90a forward runs persistent blocks (one a multiprocessor, each taking tiles from
#: a counter, longest first), so that one tile's start and end overlap another's; one tile
#: a block only where the tiles would overflow the counter's int32 (_MAX_TILES).
#: ``CUFLASH_SM90_PERSISTENT=0`` turns the persistent blocks off. Until h20's schedule the
#: persistent blocks were slower past 16 key tiles a tile (perf-log h18, h19), and this
#: limit kept them to shorter ones; now they are 0.5–5% faster at every length (h22).
#: An int caps the key tiles a tile may walk in a persistent block (None: no cap).
FWD_PERSISTENT = os.environ.get("CUFLASH_SM90_PERSISTENT", "1") != "0"
FWD_PERSISTENT_MAX_KEY_TILES: int | None = None
#: The persistent forward's blocks (None: one a multiprocessor); tests set a few, so that
#: each block walks many tiles.
FWD_MAX_BLOCKS = None


def _tile_counters():
    """The persistent forward's two int32 counters for the current device and stream
    (tiles taken, blocks done): zero before each launch, since each launch's last block
    resets them, and launches on one stream run one after the other."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    key = (cupy.cuda.Device().id, stream.ptr)
    buf = _TILE_COUNTERS.get(key)
    if buf is None:  # (zeroed on this stream, before its first launch)
        buf = _TILE_COUNTERS[key] = cupy.zeros(2, np.int32)
    return buf


_TILE_COUNTERS: dict = {}
