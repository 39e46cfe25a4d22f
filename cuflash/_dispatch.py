"""GPU dispatch: pick the specialisation, compile it once (NVRTC via CuPy), launch it.

Input checking is done by :mod:`cuflash._api`; this module trusts its arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from . import _kernels, _options, _sm90

_MAX_GRID_YZ = 65535
_ATTR_MAX_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin

# (spec, device id) -> cupy.RawKernel. One RawModule per specialisation.
_kernel_cache: dict = {}


def _cupy():
    import cupy

    return cupy


_spec_cache: dict = {}  # (selector, its arguments, device id) -> spec(s)


def device_arch() -> int:
    """Compute capability of the current device, e.g. 90."""
    return int(_cupy().cuda.Device().compute_capability)


def _selected(select, *args, **kwargs):
    """``select(*args, arch, **kwargs)`` on the current device, memoised: spec selection
    builds and sizes several candidate specs, which would otherwise cost every call."""
    dev = _cupy().cuda.Device().id
    key = (select, args, tuple(sorted(kwargs.items())), dev)
    specs = _spec_cache.get(key)
    if specs is None:
        specs = _spec_cache[key] = select(*args, device_arch(), **kwargs)
    return specs


def get_kernel(spec, name: str | None = None):
    """The compiled kernel ``name`` (default: the spec's main one) of ``spec`` on the
    current device; the spec's module is compiled on first use."""
    cp = _cupy()
    dev = cp.cuda.Device().id
    name = name or spec.name_expression
    key = (spec, name, dev)
    kern = _kernel_cache.get(key)
    if kern is None:
        names = list(getattr(spec, "name_expressions", (spec.name_expression,)))
        mod = cp.RawModule(code=_kernels.source_text(spec.source),
                           options=_kernels.compile_options(), name_expressions=names)
        for n in names:
            k = mod.get_function(n)
            if spec.smem_bytes > 48 * 1024:
                k.max_dynamic_shared_size_bytes = spec.smem_bytes
            _kernel_cache[(spec, n, dev)] = k
        kern = _kernel_cache[key]
    return kern


def clear_kernel_cache() -> None:
    """Forget the in-memory modules (CuPy's on-disk cache is kept) and spec choices."""
    _kernel_cache.clear()
    _spec_cache.clear()
    _sm90._functions.clear()


def _elem_strides(x) -> tuple[int, ...]:
    """Strides in the kernels' 16-bit units (a float32 element is two; kernels/common.cuh).
    Strides of size-1 dims never move the pointer: 0, so they pass alignment checks."""
    return tuple(0 if n == 1 else s // 2 for n, s in zip(x.shape, x.strides))


def _units(dtype) -> int:
    """16-bit units per element."""
    return np.dtype(dtype).itemsize // 2


def is_vec_aligned(arrays, head_dim: int, head_dim_v: int) -> bool:
    """Whether 16-byte copies are legal: aligned bases, and strides and head dims that are
    whole 16-byte chunks."""
    w = _units(arrays[0].dtype)
    if head_dim * w % 8 or head_dim_v * w % 8:
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


def _first_fitting(specs):
    """The first spec whose shared memory fits this device."""
    limit = max_smem_per_block()
    for spec in specs:
        if spec.smem_bytes <= limit:
            return spec
    raise RuntimeError(f"{specs[-1].label} needs {specs[-1].smem_bytes} bytes of shared "
                       f"memory; this device allows {limit}")


def select_fwd_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, vec: bool,
                    arch: int, options: bool = False, dropout: bool = False) -> _kernels.FwdSpec:
    spec = _kernels.fwd_spec(dtype, head_dim, head_dim_v, causal, vec, arch, options=options,
                             dropout=dropout)
    candidates = [spec]
    if spec.tile.stages == 2:
        # Smaller parts (sm_86/sm_89: 99 KB) get FlashAttention-2's single-stage schedule.
        t = spec.tile
        candidates.append(_kernels.fwd_spec(
            dtype, head_dim, head_dim_v, causal, vec, arch,
            tile=_kernels.FwdTile(t.block_m, t.block_n, t.num_warps, 1, 1), options=options,
            dropout=dropout))
    return _first_fitting(candidates)


def _kernel_mask(causal: bool, options) -> tuple[bool, bool, bool]:
    """(causal template flag, options kernel, dropout kernel) for a call: a window other
    than causal runs the options kernel's mask, with the causal flag off."""
    return ((causal or options.causal) and not options.local, options.kernel,
            options.dropout_p > 0)


def _option_args(options, scale: float, seqlen_q: int, seqlen_k: int, alibi_slopes,
                 heads_q: int, batch0: int) -> tuple:
    """The options' kernel arguments: window, softcap, ALiBi slopes (B, Hq) and their batch
    stride, dropout (threshold, 1 / (1 - p), seed, and the dropout counter of this call's
    first (batch, head): ``batch0 * heads_q``, batch0 being the flat batch index of the
    views' first element). Plain kernels receive and ignore them."""
    left, right = options.window_args(seqlen_q, seqlen_k)
    softcap_in, softcap_out = options.softcap_args(scale)
    if alibi_slopes is None:
        slopes, slopes_stride = np.uint64(0), 0
    else:
        slopes, slopes_stride = alibi_slopes, alibi_slopes.strides[0] // 4
    threshold, dropout_scale, seed = options.dropout_args()
    return (np.int32(left), np.int32(right), np.float32(softcap_in), np.float32(softcap_out),
            slopes, np.int64(slopes_stride), np.uint32(threshold), np.float32(dropout_scale),
            np.uint64(seed), np.uint32((batch0 * heads_q) % 2**32))


def _batch_slice(args: tuple, sl: slice, heads_q: int) -> tuple:
    """_option_args for the batch elements ``sl`` (the slopes array is sliced, the dropout
    counter moved on)."""
    slopes = args[4]
    bh0 = np.uint32((int(args[9]) + sl.start * heads_q) % 2**32)
    return (args[:4] + ((slopes if isinstance(slopes, np.generic) else slopes[sl]),)
            + args[5:9] + (bh0,))


@dataclasses.dataclass(frozen=True)
class Packed:
    """Packed variable-length sequences (cuflash.attention_varlen): the arrays are views
    ``(1, H, total, D)`` (lse ``(1, Hq, total_q)``); sequence b is the rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q (and the matching rows of k, v)."""

    cu_seqlens_q: object  # int32 device arrays (batch + 1,)
    cu_seqlens_k: object
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int

    def stats_rows(self, total_q: int) -> int:
        """Rows per head of the backward's row statistics: each sequence padded to whole
        tiles of BWD_ROW_PAD rows (kernels/seqlens.cuh, SeqLens::stats_start)."""
        pad = _kernels.BWD_ROW_PAD
        return (total_q + pad * (self.batch + 2)) // pad * pad


_NULL = np.uint64(0)


def _shape(q, k, v, packed):
    """(B, Hq, Lq, D, Hk, Lk, Dv) of a launch: for packed sequences B is their number and
    Lq, Lk their maxima."""
    B, Hq, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if packed is not None:
        B, Lq, Lk = packed.batch, packed.max_seqlen_q, packed.max_seqlen_k
    return B, Hq, Lq, D, Hk, Lk, Dv


def _batch_view(x, b0, packed):
    """``x`` from batch element b0 on (packed views have one batch row, stride 0)."""
    return x if packed is not None else x[b0:]


def forward(q, k, v, out, lse, *, causal: bool, scale: float, spec=None,
            options=_options.NONE, alibi_slopes=None, packed: Packed | None = None,
            batch0: int = 0) -> None:
    """Launch the forward kernel on 4-D views ``(B, H, L, D)``; lse is ``(B, Hq, Lq)``;
    ``alibi_slopes`` (with ``options``) is ``(B, Hq)``; ``packed``: see :class:`Packed`;
    ``batch0``: the flat batch index of the views' first element (dropout counters).

    ``out`` and ``lse`` are written in full (every row of every head).
    """
    B, Hq, Lq, D, Hk, Lk, Dv = _shape(q, k, v, packed)
    if B == 0 or Hq == 0 or Lq == 0:
        return
    causal, with_options, with_dropout = _kernel_mask(causal, options)
    option_args = _option_args(options, scale, Lq, Lk, alibi_slopes, Hq, batch0)
    if spec is None and _sm90.available(device_arch()):
        hopper = _sm90.fwd_spec_for(q, k, v, out, causal=causal, scale=scale,
                                    options_kernel=with_options, dropout_kernel=with_dropout,
                                    packed=packed)
        if hopper is not None:
            _sm90.forward(hopper, q, k, v, out, lse, scale=scale, option_args=option_args,
                          packed=packed)
            return
    if spec is None:
        vec = is_vec_aligned((q, k, v, out), D, Dv)
        spec = _selected(select_fwd_spec, _dtype_name(q.dtype), D, Dv, causal, vec,
                         options=with_options, dropout=with_dropout)
    kern = get_kernel(spec)
    w = _units(q.dtype)  # the kernels bound their copies by head dims in 16-bit units
    qs, ks, vs, os_ = (_elem_strides(x) for x in (q, k, v, out))
    ls = tuple(s // 4 for s in lse.strides)
    grid_m = math.ceil(Lq / spec.tile.block_m)
    cu = (_NULL, _NULL) if packed is None else (packed.cu_seqlens_q, packed.cu_seqlens_k)
    for b0 in range(0, B, _MAX_GRID_YZ):
        nb = min(_MAX_GRID_YZ, B - b0)
        at = lambda x: _batch_view(x, b0, packed)  # noqa: E731
        args = (
            at(q), at(k), at(v), at(out), at(lse),
            np.int64(qs[0]), np.int64(qs[1]), np.int64(qs[2]),
            np.int64(ks[0]), np.int64(ks[1]), np.int64(ks[2]),
            np.int64(vs[0]), np.int64(vs[1]), np.int64(vs[2]),
            np.int64(os_[0]), np.int64(os_[1]), np.int64(os_[2]),
            np.int64(ls[0]), np.int64(ls[1]),
            np.int32(Lq), np.int32(Lk), np.int32(D * w), np.int32(Dv * w), np.int32(Hq // Hk),
            np.float32(scale * math.log2(math.e)),
            *_batch_slice(option_args, slice(b0, b0 + nb), Hq),
            *(c if packed is None else c[b0:] for c in cu),
        )
        kern((grid_m, Hq, nb), (spec.threads, 1, 1), args, shared_mem=spec.smem_bytes)


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _kernels.DTYPES:
        raise TypeError(f"no GPU kernel for dtype {name}")
    return name


def select_bwd_specs(dtype: str, head_dim: int, head_dim_v: int, causal: bool, vec: bool,
                     arch: int, deterministic: bool, options: bool = False,
                     dropout: bool = False):
    """(preprocess spec, main spec, dQ-pass spec or None) for one backward call.

    Where no atomic-dQ tile fits the device's shared memory (head dims above 224 on
    sm_86/sm_89 parts, 99 KB a block), the deterministic pair of kernels is used instead:
    the same gradients, summed in a fixed order.
    """
    bucket = max(_kernels.head_dim_bucket(head_dim, dtype),
                 _kernels.head_dim_bucket(head_dim_v, dtype))

    def main_specs(atomic):
        return [_kernels.bwd_spec(dtype, head_dim, head_dim_v, causal, vec, arch, atomic, tile=t,
                                  options=options, dropout=dropout)
                for t in _kernels.bwd_tiles(bucket, atomic, options, dtype)]

    limit = max_smem_per_block()
    if not deterministic and all(s.smem_bytes > limit for s in main_specs(True)):
        deterministic = True
    main = _first_fitting(main_specs(not deterministic))
    dq = None
    if deterministic:
        dq = _first_fitting([
            _kernels.bwd_dq_spec(dtype, head_dim, head_dim_v, causal, vec, arch, tile=t,
                                 options=options, dropout=dropout)
            for t in _kernels.bwd_dq_tiles(bucket, options, dtype)])
    return _kernels.BwdPrepSpec(dtype, arch), main, dq


def _i64(*xs):
    return tuple(np.int64(x) for x in xs)


def backward(dout, q, k, v, out, lse, dq, dk, dv, *, causal: bool, scale: float,
             deterministic: bool, main_spec=None, dq_spec=None, options=_options.NONE,
             alibi_slopes=None, packed: Packed | None = None, batch0: int = 0) -> None:
    """Launch the backward pass on 4-D views ``(B, H, L, D)`` (lse: ``(B, Hq, Lq)``);
    ``batch0`` as in :func:`forward`.

    dq, dk and dv are written in full. Launches: preprocess (delta, lse in log2 units),
    the main kernel over key tiles (dK, dV and, unless deterministic, dQ by float
    atomics), then the dQ conversion, or the deterministic dQ pass.
    """
    cp = _cupy()
    B, Hq, Lq, D, Hk, Lk, Dv = _shape(q, k, v, packed)
    if B == 0 or Hk == 0:
        return
    causal, with_options, with_dropout = _kernel_mask(causal, options)
    vec = is_vec_aligned((q, k, v, dout, dq, dk, dv), D, Dv)
    prep, main, dq_pass = _selected(select_bwd_specs, _dtype_name(q.dtype), D, Dv, causal,
                                    vec, deterministic=deterministic, options=with_options,
                                    dropout=with_dropout)
    option_args = _option_args(options, scale, Lq, Lk, alibi_slopes, Hq, batch0)
    hopper = None
    # (a sweep that names its own portable kernels, tools/tune_bwd.py, gets them)
    if main_spec is None and dq_spec is None and _sm90.available(device_arch()):
        hopper = _sm90.bwd_spec_for(q, k, v, dout, dk, dv, causal=causal, scale=scale,
                                    options_kernel=with_options, dropout_kernel=with_dropout,
                                    packed=packed, deterministic=deterministic)
    if main_spec is not None:  # tile sweeps (tools/tune_bwd.py)
        main = main_spec
    if dq_spec is not None and deterministic:
        dq_pass = dq_spec
    n_blocks = -(-Lk // main.tile.block_n)
    if causal and n_blocks > _MAX_GRID_YZ:  # causal grids put the key tiles on z
        raise ValueError(f"causal backward supports at most "
                         f"{_MAX_GRID_YZ * main.tile.block_n} keys at head dim {D}, "
                         f"got Lk = {Lk}")
    pad = _kernels.BWD_ROW_PAD
    lq_pad = -(-Lq // pad) * pad  # rows of statistics per (batch, head) and sequence
    stats_pad = lq_pad if packed is None else packed.stats_rows(q.shape[2])  # per head
    nb_stats = B if packed is None else 1
    lse_log2 = cp.empty((nb_stats, Hq, stats_pad), dtype=cp.float32)
    delta = cp.empty((nb_stats, Hq, stats_pad), dtype=cp.float32)
    accum_spec = main if hopper is None else hopper  # the kernel that fills dq_accum
    # (the deterministic mode's portable kernels write dQ in a pass of their own; the
    # sm_90a kernel adds to dq_accum in a fixed order, taking turns by dq_sem)
    dq_accum = None if deterministic and hopper is None else cp.zeros(
        (nb_stats, Hq, stats_pad, accum_spec.head_dim), cp.float32)
    dq_sem = None
    if deterministic and hopper is not None:
        dq_sem = cp.zeros(_sm90.dq_sem_size(nb_stats * Hq * stats_pad), cp.int32)
        dq_pass = None
    cu = (_NULL, _NULL) if packed is None else (packed.cu_seqlens_q, packed.cu_seqlens_k)
    qs, ks, vs, dos, os_, dqs, dks, dvs = (
        _elem_strides(x) for x in (q, k, v, dout, out, dq, dk, dv))
    ls = tuple(s // 4 for s in lse.strides)
    scale_log2 = np.float32(scale * math.log2(math.e))
    w = _units(q.dtype)  # head dims in 16-bit units for the main kernel and the dQ pass
    for b0 in range(0, B, _MAX_GRID_YZ):
        nb = min(_MAX_GRID_YZ, B - b0)
        sl = slice(b0, b0 + nb)
        at = lambda x: _batch_view(x, b0, packed)  # noqa: E731
        cu_at = tuple(c if packed is None else c[b0:] for c in cu)
        # packed: sequence b0 + i's statistics start BWD_ROW_PAD * b0 rows further on than
        # the kernels compute from i (kernels/seqlens.cuh)
        st = at if packed is None else (lambda x: x[:, :, pad * b0:])  # noqa: E731
        if lq_pad and Hq:
            get_kernel(prep, prep.name_expressions[0])(
                (lq_pad // prep.rows_per_block, Hq, nb), (prep.threads, 1, 1),
                (at(out), at(dout), at(lse), st(lse_log2), st(delta), *_i64(*os_[:3]),
                 *_i64(*dos[:3]), *_i64(*ls), np.int32(Lq), np.int32(stats_pad), np.int32(Dv),
                 cu_at[0]))
        if Lk and hopper is not None:
            _hopper_backward(hopper, prep, q, k, v, dout, lse_log2, delta, dq_accum, dk, dv,
                             stats_pad=stats_pad, scale=scale, options=options,
                             option_args=option_args, packed=packed, dq_sem=dq_sem)
        elif Lk:
            accum = st(dq_accum) if dq_accum is not None else st(delta)  # unused if None
            # causal: (heads, batch, key tiles), heaviest tiles first (kernels/flash_bwd.cu)
            grid = (Hk, nb, n_blocks) if causal else (n_blocks, Hk, nb)
            get_kernel(main)(
                grid, (main.threads, 1, 1),
                (at(q), at(k), at(v), at(dout), st(lse_log2), st(delta), accum, at(dk), at(dv),
                 *_i64(*qs[:3], *ks[:3], *vs[:3], *dos[:3], *dks[:3], *dvs[:3]),
                 np.int32(Lq), np.int32(Lk), np.int32(stats_pad), np.int32(Hq), np.int32(D * w),
                 np.int32(Dv * w), np.int32(Hq // Hk), scale_log2, np.float32(scale),
                 *_batch_slice(option_args, sl, Hq), *cu_at),
                shared_mem=main.smem_bytes)
        if Lq == 0 or Hq == 0:
            continue
        if dq_pass is not None:
            get_kernel(dq_pass)(
                (-(-Lq // dq_pass.tile.block_m), Hq, nb), (dq_pass.threads, 1, 1),
                (at(q), at(k), at(v), at(dout), st(lse_log2), st(delta), at(dq),
                 *_i64(*qs[:3], *ks[:3], *vs[:3], *dos[:3], *dqs[:3]),
                 np.int32(Lq), np.int32(Lk), np.int32(stats_pad), np.int32(D * w),
                 np.int32(Dv * w), np.int32(Hq // Hk), scale_log2, np.float32(scale),
                 *_batch_slice(option_args, sl, Hq), *cu_at),
                shared_mem=dq_pass.smem_bytes)
        else:
            _convert_accum(prep, accum_spec, st(dq_accum), at(dq), dqs, rows=Lq,
                           rows_pad=stats_pad, heads=Hq, batches=nb, factor=scale,
                           cu_seqlens=cu_at[0])


def _hopper_backward(spec, prep, q, k, v, dout, lse_log2, delta, dq_accum, dk, dv, *,
                     stats_pad: int, scale: float, options, option_args, packed,
                     dq_sem=None) -> None:
    """The sm_90a main backward kernel; where it splits GQA groups over several blocks,
    their float32 dK/dV partial sums are then converted by the dQ conversion kernel.
    ``dq_sem``: the deterministic mode's turns (:func:`_sm90.backward_main`)."""
    cp = _cupy()
    splits = _sm90.kv_splits(spec, q, k, packed)
    if splits == 1:
        _sm90.backward_main(spec, q, k, v, dout, lse_log2, delta, dq_accum, dk, dv,
                            seqlen_q_pad=stats_pad, scale=scale, option_args=option_args,
                            packed=packed, dq_sem=dq_sem)
        return
    B, Hk, Lk = k.shape[:3]
    rows = _sm90.dkv_accum_rows(spec, k)
    dk_accum, dv_accum = (cp.zeros((B, Hk, rows, spec.head_dim), cp.float32) for _ in range(2))
    _sm90.backward_main(spec, q, k, v, dout, lse_log2, delta, dq_accum, dk, dv,
                        seqlen_q_pad=stats_pad, scale=scale, option_args=option_args,
                        splits=splits, dk_accum=dk_accum, dv_accum=dv_accum)
    threshold, dropout_scale, _ = options.dropout_args()
    for accum, grad, factor in ((dk_accum, dk, scale),
                                (dv_accum, dv, dropout_scale if threshold else 1.0)):
        _convert_accum(prep, spec, accum, grad, _elem_strides(grad), rows=Lk, rows_pad=rows,
                       heads=Hk, batches=B, factor=factor)


def _convert_accum(prep, spec, accum, grad, grad_strides, *, rows: int, rows_pad: int,
                   heads: int, batches: int, factor: float, cu_seqlens=_NULL) -> None:
    """grad = factor * accum, in grad's dtype: ``accum`` holds float32 partial sums in the
    fragment order ``spec.dq_layout`` of the kernel that filled it, ``rows_pad`` rows per
    (batch, head), of which ``rows`` are real (the preprocess module's conversion kernel;
    ``cu_seqlens``: packed sequences' query starts)."""
    D = grad.shape[3]
    block_m = spec.dq_layout[0]
    quads = -(-rows // block_m) * block_m * spec.head_dim // 4  # a thread per float4
    get_kernel(prep, prep.name_expressions[1])(
        (-(-quads // 256), heads, batches), (256, 1, 1),
        (accum, grad, *_i64(*grad_strides[:3]), np.int32(rows), np.int32(rows_pad),
         np.int32(D), np.int32(spec.head_dim), *(np.int32(x) for x in spec.dq_layout),
         np.float32(factor), cu_seqlens))


def dropout_mask(out, seqlen_q: int, seqlen_k: int, options, transposed: bool) -> None:
    """Write the keep mask of ``options``' dropout into ``out``, uint8 ``(B * Hq, Lq, Lk)``,
    C-contiguous (1 = kept), with the forward kernel's code or, ``transposed``, the main
    backward kernel's (kernels/dropout_mask.cu). Row ``b * Hq + h`` is (batch b, head h)."""
    if out.size == 0:
        return
    if out.shape[0] > _MAX_GRID_YZ:
        raise ValueError(f"dropout_mask covers at most {_MAX_GRID_YZ} (batch, head) pairs a "
                         f"call, got {out.shape[0]}")
    spec = _kernels.DropoutMaskSpec(device_arch())
    threshold, _, seed = options.dropout_args()
    kern = get_kernel(spec, spec.name_expressions[int(bool(transposed))])
    kern((-(-seqlen_k // 16), -(-seqlen_q // 16), out.shape[0]), (32, 1, 1),
         (out, np.int32(seqlen_q), np.int32(seqlen_k), np.uint32(threshold), np.uint64(seed)))
