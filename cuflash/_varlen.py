"""Packed variable-length sequences: :func:`attention_varlen` and its backward.

The GPU path runs the same kernels as :func:`cuflash.attention`, which read each
sequence's rows from ``cu_seqlens`` (kernels/seqlens.cuh); the NumPy path runs the float64
reference on each sequence.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _api, _options, _reference


def _check_packed(q, k, v) -> tuple[int, int]:
    """(total, H, D) shapes; returns (D, Dv)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape (total, heads, head_dim), got {x.shape}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head_dim differ: {q.shape[-1]} != {k.shape[-1]}")
    for name, d in (("head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
        if not 1 <= d <= _api._MAX_HEAD_DIM:
            raise ValueError(f"{name} must be between 1 and {_api._MAX_HEAD_DIM}, got {d}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must share (total_k, heads), got {k.shape[:2]} and "
                         f"{v.shape[:2]}")
    if q.shape[1] % max(k.shape[1], 1) or (k.shape[1] == 0) != (q.shape[1] == 0):
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    return q.shape[-1], v.shape[-1]


def _check_cu_seqlens(xp, cu_q, cu_k, max_q, max_k, total_q, total_k):
    """The prefix sums and maxima, checked on the host (one small copy each from the GPU,
    which waits for the stream). Returns the sequences' (max_q, max_k)."""
    values = {}
    for name, cu, total in (("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)):
        if not isinstance(cu, xp.ndarray):
            raise TypeError(f"{name} must be a {xp.__name__}.ndarray like q, "
                            f"got {type(cu).__name__}")
        if cu.dtype != np.int32:
            raise TypeError(f"{name}.dtype must be int32, got {cu.dtype}")
        if cu.ndim != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must have shape (batch + 1,), got {cu.shape}")
        host = cu if xp is np else cu.get()
        if host[0] != 0 or host[-1] != total or np.any(np.diff(host) < 0):
            raise ValueError(f"{name} must rise from 0 to {total} (the packed rows) without "
                             f"falling, got {host.tolist()[:8]}{'...' if host.size > 8 else ''}")
        values[name] = host
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one shape (batch + 1,), got "
                         f"{cu_q.shape} and {cu_k.shape}")
    longest = []
    for name, given, host in (("max_seqlen_q", max_q, values["cu_seqlens_q"]),
                              ("max_seqlen_k", max_k, values["cu_seqlens_k"])):
        if isinstance(given, (bool, np.bool_)) or not isinstance(given, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(given).__name__}")
        actual = int(np.diff(host).max()) if host.size > 1 else 0
        if given < actual:
            raise ValueError(f"{name} ({given}) is below the longest sequence ({actual})")
        longest.append(actual)
    return tuple(longest)


def _prepare(xp, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, options):
    """Shared checks of the forward and backward calls: (causal, scale, opts, max_q, max_k)."""
    causal = _api._check_bool("causal", causal)
    _api._check_dtypes(q, k, v)
    D, _ = _check_packed(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _api._check_last_dim_contiguous(name, x)
    scale = _api._check_scale(scale, D)
    max_q, max_k = _check_cu_seqlens(xp, cu_q, cu_k, max_q, max_k, q.shape[0], k.shape[0])
    heads = (cu_q.shape[0] - 1, q.shape[1])  # ALiBi slopes: (Hq,) or (batch, Hq)
    opts = _options.parse(xp, q, causal, options, heads_shape=heads)
    return causal, scale, opts, max_q, max_k


def _reference_dropout(opts, q, cu_seqlens_q, max_q, max_k) -> dict:
    """The reference's dropout arguments: the keep mask (batch, Hq, max_q, max_k), from
    which sequence b takes its corner (positions i, j counted from its own first rows)."""
    return opts.reference_dropout(len(cu_seqlens_q) - 1, q.shape[1], max_q, max_k)


def _heads_first(x):
    """(total, H, D) -> (1, H, total, D) view; (H, total) -> (1, H, total)."""
    return (x.swapaxes(0, 1) if x.ndim == 3 else x)[None]


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, return_lse=False, out=None, **options):
    """Attention over packed sequences of different lengths, fused.

    Sequence ``b`` is the rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and attends to the
    rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v: no padding is stored or
    computed. Causal and window alignment are per sequence (bottom-right of each).

    Parameters
    ----------
    q : array, shape ``(total_q, Hq, D)``
    k, v : arrays, shapes ``(total_k, Hk, D)`` and ``(total_k, Hk, Dv)``
        float16, bfloat16 or float32; ``Hq % Hk == 0``; any strides with a contiguous last
        dim.
    cu_seqlens_q, cu_seqlens_k : int32 arrays, shape ``(batch + 1,)``
        Prefix sums of the sequence lengths (0 first, the total last); lengths may be 0.
        They are checked on the host: for CuPy arrays that is a small copy, which waits
        for the current stream.
    max_seqlen_q, max_seqlen_k : int
        At least the longest sequence of each.
    causal, scale, return_lse, window, softcap
        As in :func:`cuflash.attention`.
    alibi_slopes : float32 array, shape ``(Hq,)`` or ``(batch, Hq)``, optional
    out : array, shape ``(total_q, Hq, Dv)``, optional

    Returns
    -------
    out : array, shape ``(total_q, Hq, Dv)``, dtype of q
    lse : float32 array, shape ``(Hq, total_q)`` (with ``return_lse=True``)

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((10, 2, 16)).astype(np.float16) for _ in range(3))
    >>> cu = np.array([0, 3, 3, 10], np.int32)   # lengths 3, 0 and 7
    >>> out = cuflash.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True)
    >>> out.shape
    (10, 2, 16)
    """
    xp = _api._array_module(q=q, k=k, v=v, **({} if out is None else {"out": out}))
    return_lse = _api._check_bool("return_lse", return_lse)
    causal, scale, opts, max_q, max_k = _prepare(xp, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, causal, scale,
                                                 options)
    out = _api._check_output("out", out, xp, q.shape[:2] + v.shape[-1:], q.dtype)
    if out is not None:
        _api._check_no_overlap({"out": out}, {"q": q, "k": k, "v": v})
    if xp is np:
        ref_out, ref_lse = _reference.attention_varlen_naive(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
            **opts.reference_kwargs(), **_reference_dropout(opts, q, cu_seqlens_q, max_q, max_k))
        out = _api._into(out, ref_out, q.dtype)
        lse = ref_lse.astype(np.float32)
        return (out, lse) if return_lse else out

    out, lse = _gpu_forward(xp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, out, None,
                            causal, scale, opts)
    return (out, lse) if return_lse else out


def attention_varlen_into(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          out, lse, *, causal, scale, **options):
    """The packed forward on CuPy arrays, into the caller's ``out`` and ``lse`` (float32,
    ``(Hq, total_q)``, any strides with a contiguous last dim): for the framework adapters,
    whose framework owns every output. Same checks as :func:`attention_varlen`."""
    xp = _api._array_module(q=q, k=k, v=v, out=out, lse=lse)
    if xp is np:
        raise TypeError("attention_varlen_into runs on CuPy arrays only")
    causal, scale, opts, max_q, max_k = _prepare(xp, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, causal, scale,
                                                 options)
    out = _api._check_output("out", out, xp, q.shape[:2] + v.shape[-1:], q.dtype)
    if lse.shape != (q.shape[1], q.shape[0]) or lse.dtype != np.float32:
        raise ValueError(f"lse must be float32 of shape {(q.shape[1], q.shape[0])}, got "
                         f"{lse.dtype} {lse.shape}")
    _api._check_last_dim_contiguous("lse", lse)
    _api._check_no_overlap({"out": out, "lse": lse}, {"q": q, "k": k, "v": v})
    _gpu_forward(xp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, out, lse, causal,
                 scale, opts)


def _gpu_forward(cp, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, opts):
    from . import _dispatch

    _api._check_device(cp, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_q,
                       cu_seqlens_k=cu_k, alibi_slopes=opts.alibi_slopes)
    if out is None:
        out = cp.empty(q.shape[:2] + v.shape[-1:], dtype=q.dtype)
    if lse is None:
        lse = cp.empty((q.shape[1], q.shape[0]), dtype=cp.float32)
    packed = _dispatch.Packed(cu_q, cu_k, cu_q.shape[0] - 1, max_q, max_k)
    if out.size:
        _dispatch.forward(_heads_first(q), _heads_first(k), _heads_first(v), _heads_first(out),
                          lse[None], causal=causal, scale=scale, options=opts,
                          alibi_slopes=opts.alibi_slopes, packed=packed)
    return out, lse


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                              deterministic=False, dq=None, dk=None, dv=None, **options):
    """Gradients of :func:`attention_varlen`: ``(dq, dk, dv)`` with the shapes of q, k, v.

    ``out`` and ``lse`` (``(Hq, total_q)``, float32) come from the forward call with the
    same arguments; see :func:`cuflash.attention_backward` for ``deterministic`` and the
    ``dq=``, ``dk=``, ``dv=`` outputs.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((10, 2, 16)).astype(np.float16) for _ in range(3))
    >>> cu = np.array([0, 3, 3, 10], np.int32)
    >>> out, lse = cuflash.attention_varlen(q, k, v, cu, cu, 7, 7, return_lse=True)
    >>> dout = rng.standard_normal(out.shape).astype(np.float16)
    >>> dq, dk, dv = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, 7, 7)
    >>> dq.shape == q.shape
    True
    """
    grads = {n: x for n, x in (("dq", dq), ("dk", dk), ("dv", dv)) if x is not None}
    xp = _api._array_module(dout=dout, q=q, k=k, v=v, out=out, lse=lse, **grads)
    deterministic = _api._check_bool("deterministic", deterministic)
    causal, scale, opts, max_q, max_k = _prepare(xp, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, causal, scale,
                                                 options)
    out_shape = q.shape[:2] + v.shape[-1:]
    for name, x in (("dout", dout), ("out", out)):
        if x.shape != out_shape:
            raise ValueError(f"{name} must have shape {out_shape}, got {x.shape}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must be {q.dtype} (the dtype of q), got {x.dtype}")
        _api._check_last_dim_contiguous(name, x)
    if lse.shape != (q.shape[1], q.shape[0]) or lse.dtype != np.float32:
        raise ValueError(f"lse must be float32 of shape {(q.shape[1], q.shape[0])}, got "
                         f"{lse.dtype} {lse.shape}")
    dq = _api._check_output("dq", dq, xp, q.shape, q.dtype)
    dk = _api._check_output("dk", dk, xp, k.shape, q.dtype)
    dv = _api._check_output("dv", dv, xp, v.shape, q.dtype)
    _api._check_no_overlap({"dq": dq, "dk": dk, "dv": dv},
                           {"dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": lse})
    if xp is np:
        ref = _reference.attention_varlen_backward_naive(
            dout, q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
            **opts.reference_kwargs(), **_reference_dropout(opts, q, cu_seqlens_q, max_q, max_k))
        return tuple(_api._into(given, g, q.dtype) for given, g in zip((dq, dk, dv), ref))

    from . import _dispatch

    cp = xp
    _api._check_device(cp, dout=dout, q=q, k=k, v=v, out=out, lse=lse, dq=dq, dk=dk, dv=dv,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       alibi_slopes=opts.alibi_slopes)
    dq, dk, dv = _api._gradient_arrays(cp, q, k, v, dq, dk, dv)
    if dq.size + dk.size + dv.size == 0:
        return dq, dk, dv
    packed = _dispatch.Packed(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1, max_q,
                              max_k)
    views = [_heads_first(x) for x in (dout, q, k, v, out)]
    _dispatch.backward(*views, lse[None], *(_heads_first(x) for x in (dq, dk, dv)),
                       causal=causal, scale=scale, deterministic=deterministic, options=opts,
                       alibi_slopes=opts.alibi_slopes, packed=packed)
    return dq, dk, dv
