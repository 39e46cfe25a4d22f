"""Public functions of cuflash, with argument checking.

The contract is the project's API document: names, shapes, causal alignment and
error rules. CuPy arrays run the fused GPU kernels (:mod:`cuflash._dispatch`);
NumPy arrays run the float64 reference (:mod:`cuflash._reference`).
"""

from __future__ import annotations

import itertools
import math
import numbers

import numpy as np

from . import _options, _reference

try:  # bfloat16 for NumPy (and CuPy, which reuses NumPy's dtype objects)
    import ml_dtypes

    _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _BFLOAT16 = None

_SUPPORTED = tuple(d for d in (np.dtype(np.float16), _BFLOAT16, np.dtype(np.float32))
                   if d is not None)
_MAX_HEAD_DIM = 256


def _array_module(**arrays):
    """numpy or cupy, from the arrays' type; a TypeError names any odd one out."""
    kinds = {}
    for name, x in arrays.items():
        if isinstance(x, np.ndarray):
            kinds[name] = "numpy"
        elif type(x).__module__.startswith("cupy") and hasattr(x, "__cuda_array_interface__"):
            kinds[name] = "cupy"
        else:
            raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, "
                            f"got {type(x).__module__}.{type(x).__name__}")
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{n}: {k}" for n, k in kinds.items())
        names = ", ".join(kinds)
        raise TypeError(f"{names} must all be NumPy or all be CuPy arrays ({detail})")
    if "cupy" in kinds.values():
        import cupy

        return cupy
    return np


def _check_dtypes(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _SUPPORTED:
            raise TypeError(f"{name}.dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_last_dim_contiguous(name: str, x) -> None:
    if x.size and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        raise ValueError(
            f"{name} must have a contiguous last dimension (stride {x.itemsize} bytes), "
            f"got strides {x.strides}; pass a view whose last axis is the head dim")


def _check_shapes(q, k, v) -> tuple[int, int]:
    """Checks the shapes against each other; returns the head dims (D, Dv)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., L, D), got shape {x.shape}")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"q, k and v must have the same number of dimensions, "
                         f"got shapes {q.shape}, {k.shape}, {v.shape}")
    D, Dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"q and k head_dim differ: {D} != {k.shape[-1]}")
    for name, d in (("q/k head_dim", D), ("v head_dim", Dv)):
        if not 1 <= d <= _MAX_HEAD_DIM:
            raise ValueError(f"{name} must be between 1 and {_MAX_HEAD_DIM}, got {d}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v sequence lengths differ: {k.shape[-2]} != {v.shape[-2]}")
    if q.ndim == 2:
        return D, Dv
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"k and v leading dims differ: {k.shape[:-2]} != {v.shape[:-2]}")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"q and k leading (batch) dims differ: {q.shape[:-3]} != {k.shape[:-3]}")
    Hq, Hk = q.shape[-3], k.shape[-3]
    if Hk == 0 and Hq != 0 or Hk and Hq % Hk:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hk})")
    return D, Dv


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_output(name, x, xp, shape, dtype):
    """A caller's output array (out, dq, dk or dv): None, or the exact shape and dtype."""
    if x is None:
        return None
    if not isinstance(x, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray like q, got {type(x).__name__}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if x.dtype != dtype:
        raise TypeError(f"{name}.dtype must be {dtype} (the dtype of q), got {x.dtype}")
    _check_last_dim_contiguous(name, x)
    return x


def _extent(x) -> tuple[int, int]:
    """[first, last) byte addresses that array x can touch."""
    if isinstance(x, np.ndarray):
        ptr = x.__array_interface__["data"][0]
    else:
        ptr = x.data.ptr
    if x.size == 0:
        return ptr, ptr
    lo = ptr + sum(s * (n - 1) for n, s in zip(x.shape, x.strides) if s < 0)
    hi = ptr + sum(s * (n - 1) for n, s in zip(x.shape, x.strides) if s > 0) + x.itemsize
    return lo, hi


def _check_no_overlap(outputs: dict, inputs: dict) -> None:
    """Outputs may not share memory with the inputs or with each other: a kernel that
    writes one while another reads the other would give wrong results."""
    seen = {name: _extent(y) for name, y in inputs.items() if y is not None and y.size}
    for name, x in outputs.items():
        if x is None or not x.size:
            continue
        lo, hi = _extent(x)
        for other, (ylo, yhi) in seen.items():
            if lo < yhi and ylo < hi:
                raise ValueError(f"{name} overlaps {other} in memory; pass separate arrays")
        seen[name] = (lo, hi)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, out=None, **options):
    r"""Exact scaled dot-product attention, fused (FlashAttention-2 forward).

    ``out = softmax(scale * q @ k^T + mask) @ v``, computed tile by tile: the score matrix
    never exists in memory.

    Parameters
    ----------
    q : cupy.ndarray or numpy.ndarray, shape ``(..., Hq, Lq, D)`` or ``(Lq, D)``
        Queries. float16, bfloat16 (``ml_dtypes.bfloat16``) or float32. float32 runs the
        products on tensor cores with operands rounded to tf32 (10 mantissa bits, as
        fp16's) and float32 accumulation; inputs, output and lse stay float32.
    k : array, shape ``(..., Hk, Lk, D)`` or ``(Lk, D)``
        Keys. ``Hq`` must be a multiple of ``Hk``: query head ``h`` reads key/value head
        ``h // (Hq // Hk)`` (grouped-query attention; ``Hk == 1`` is multi-query).
    v : array, shape ``(..., Hk, Lk, Dv)`` or ``(Lk, Dv)``
        Values, same dtype as q and k.
    causal : bool, default False
        Bottom-right aligned causal mask: query ``i`` sees key ``j`` iff
        ``j <= i + Lk - Lq``. For ``Lq = 2, Lk = 5``::

            1 1 1 1 0
            1 1 1 1 1

        This equals PyTorch's ``is_causal`` only when ``Lq == Lk``.
    scale : float, optional
        Multiplies ``q @ k^T``; defaults to ``1 / sqrt(D)``.
    return_lse : bool, default False
        Also return ``lse[..., i] = log(sum_j exp(s_ij))`` (natural log, float32), which
        the backward pass needs.
    out : array, optional
        Where to write the output: shape ``(..., Hq, Lq, Dv)``, dtype of q, any strides
        with a contiguous last dimension.
    window : (int, int), optional
        Sliding window ``(left, right)``: query ``i`` sees key ``j`` iff
        ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``; -1 is unbounded on that side.
        With ``causal=True`` the right side is at most 0. Key tiles wholly outside the
        window are skipped, so the cost is about ``Lq * (left + right + 1)`` pairs.
    softcap : float, optional
        Scores become ``softcap * tanh(s / softcap)`` (Gemma 2); 0 (default) is off.
    alibi_slopes : array, float32, shape ``(Hq,)`` or ``(..., Hq)``, optional
        ALiBi: adds ``-slope * |i + Lk - Lq - j|`` to the (capped) scores, per head, or
        per batch element and head.

    Returns
    -------
    out : array, shape ``(..., Hq, Lq, Dv)``, dtype of q
    lse : array, shape ``(..., Hq, Lq)``, float32
        Only with ``return_lse=True``. A query row that sees no key gets ``out = 0`` and
        ``lse = -inf``.

    Notes
    -----
    Any strides are accepted as long as the last dimension is contiguous, so a
    ``(B, L, H, D)`` buffer is passed with no copy as ``x.transpose(0, 2, 1, 3)``.
    CuPy inputs run on the current device and stream; each specialisation (dtype,
    head-dim bucket, causal, alignment, arch) is compiled by NVRTC on first use and
    cached. Cost: ``4 * Hq * Lq * Lk * D`` FLOPs per batch element (about half when
    causal); memory traffic is one read of q, k, v and one write of out.

    See Also
    --------
    cuflash._reference.attention_naive : the float64 definition this matches.

    References
    ----------
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", 2023. M. Rabe and C. Staats, "Self-attention Does Not Need O(n^2)
    Memory", 2021.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 128, 64)).astype(np.float16) for _ in range(3))
    >>> o, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    >>> o.shape, o.dtype, lse.shape, lse.dtype
    ((2, 4, 128, 64), dtype('float16'), (2, 4, 128), dtype('float32'))
    """
    xp = _array_module(q=q, k=k, v=v, **({} if out is None else {"out": out}))
    return_lse = _check_bool("return_lse", return_lse)
    causal, scale, out = _check_forward(xp, q, k, v, causal, scale, out)
    opts = _options.parse(xp, q, causal, options)

    if xp is np and opts.dropout_p:
        ref_out, ref_lse = _reference.attention_naive(q, k, v, causal=causal, scale=scale,
                                                      **opts.reference_kwargs(),
                                                      **_reference_dropout(opts, q, k))
        out = _into(out, ref_out, q.dtype)
        lse = ref_lse.astype(np.float32)
    elif xp is np:
        ref_out, ref_lse = _reference.attention_tiled_fa2(q, k, v, causal=causal, scale=scale,
                                                          block_m=128, block_n=128,
                                                          **opts.reference_kwargs())
        out = _into(out, ref_out, q.dtype)
        lse = ref_lse.astype(np.float32)
    else:
        out, lse = _gpu_forward(xp, q, k, v, out, causal=causal, scale=scale, opts=opts)
    return (out, lse) if return_lse else out


def _reference_dropout(opts, q, k) -> dict:
    """The reference's dropout arguments for q and k of any rank: the keep mask of
    :mod:`cuflash._dropout` over the flattened batch dims, shaped ``(..., Hq, Lq, Lk)``."""
    heads = q.shape[-3] if q.ndim > 2 else 1
    batch = math.prod(q.shape[:-3]) if q.ndim > 3 else 1
    kw = opts.reference_dropout(batch, heads, q.shape[-2], k.shape[-2])
    if kw:
        kw["dropout_mask"] = kw["dropout_mask"].reshape(q.shape[:-2] + kw["dropout_mask"].shape[-2:])
    return kw


def _check_forward(xp, q, k, v, causal, scale, out):
    """The forward's argument checks; returns (causal, scale, out)."""
    causal = _check_bool("causal", causal)
    _check_dtypes(q, k, v)
    D, Dv = _check_shapes(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_last_dim_contiguous(name, x)
    scale = _check_scale(scale, D)
    out = _check_output("out", out, xp, q.shape[:-1] + (Dv,), q.dtype)
    return causal, scale, out


def attention_into(q, k, v, out, lse, *, causal, scale, **options):
    """The forward on CuPy arrays, into the caller's ``out`` and ``lse`` (float32, shape
    ``q.shape[:-1]``, any strides with a contiguous last dim). For the framework adapters, whose framework owns
    every output; same checks as :func:`attention`."""
    xp = _array_module(q=q, k=k, v=v, out=out, lse=lse)
    if xp is np:
        raise TypeError("attention_into runs on CuPy arrays only")
    causal, scale, out = _check_forward(xp, q, k, v, causal, scale, out)
    opts = _options.parse(xp, q, causal, options)
    if lse.shape != q.shape[:-1] or lse.dtype != np.float32:
        raise ValueError(f"lse must be float32 of shape {q.shape[:-1]}, "
                         f"got {lse.dtype} {lse.shape}")
    _check_last_dim_contiguous("lse", lse)  # the kernels write lse rows contiguously
    _check_no_overlap({"out": out, "lse": lse}, {"q": q, "k": k, "v": v})
    _gpu_forward(xp, q, k, v, out, causal=causal, scale=scale, lse=lse, opts=opts)


def _check_device(cp, **arrays) -> None:
    """Every given CuPy array must live on the current device."""
    dev = cp.cuda.Device().id
    for name, x in arrays.items():
        if x is not None and x.device.id != dev:
            raise ValueError(f"{name} is on device {x.device.id}, but the current device is {dev}")


def _gpu_forward(cp, q, k, v, out, *, causal, scale, lse=None, opts=_options.NONE):
    from . import _dispatch

    _check_device(cp, q=q, k=k, v=v, out=out, lse=lse, alibi_slopes=opts.alibi_slopes)
    if out is None:
        out = cp.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    if lse is None:
        lse = cp.empty(q.shape[:-1], dtype=cp.float32)
    if out.size == 0:
        return out, lse
    lead = None if q.ndim == 2 else q.shape[:-3]
    arrays = [(q, 3), (k, 3), (v, 3), (out, 3), (lse, 2)]
    if opts.alibi_slopes is not None:
        arrays.append((opts.alibi_slopes, 1))
    for batch0, views in _batched_views(lead, arrays):
        _dispatch.forward(*views[:5], causal=causal, scale=scale, options=opts,
                          alibi_slopes=views[5] if len(views) > 5 else None, batch0=batch0)
    return out, lse


def _batched_views(lead, arrays):
    """Yield ``(batch0, views)``: 4-D ``(B, H, L, D)`` views (3-D for lse-like arrays)
    that cover the arrays, and the flat index of their first batch element.

    ``lead`` is the shape of the shared leading dims; ``arrays`` holds ``(array, tail)``
    pairs, ``tail`` being the number of dims after them. Leading dims are merged into B
    when every array's strides allow it (no copy); otherwise the unmergeable outer dims
    are walked one index at a time.
    """
    if lead is None:  # 2-D inputs (L, D): one batch element, one head
        yield 0, tuple(x[(None,) * (tail + 1 - x.ndim)] for x, tail in arrays)
        return
    if len(lead) == 1:  # already (B, H, L, D): the arrays themselves
        yield 0, tuple(x for x, _ in arrays)
        return
    split = len(lead)
    # smallest split such that lead[split:] merges into one stride for every array
    while split > 0 and all(
            _mergeable(x.shape[:len(lead)][split - 1:], x.strides[:len(lead)][split - 1:])
            for x, _ in arrays):
        split -= 1
    inner = math.prod(lead[split:])
    for flat, idx in enumerate(itertools.product(*(range(n) for n in lead[:split]))):
        views = []
        for x, tail in arrays:
            y = x[idx]
            batch = math.prod(y.shape[:-tail]) if y.ndim > tail else 1
            views.append(y.reshape((batch,) + y.shape[y.ndim - tail:]))
        yield flat * inner, tuple(views)


def _mergeable(shape, strides) -> bool:
    """Whether these dims can be viewed as one dim with a single stride."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None,
                       deterministic=False, dq=None, dk=None, dv=None, **options):
    r"""Gradients of :func:`attention` (FlashAttention-2 backward), fused.

    Given ``dout = dL/d(out)``, returns ``dL/dq, dL/dk, dL/dv``. The probabilities are
    recomputed tile by tile from the forward pass's ``lse``; the score matrix is never
    stored. ``q, k, v, causal, scale`` must be those of the forward call that produced
    ``out`` and ``lse``.

    Parameters
    ----------
    dout : array, shape ``(..., Hq, Lq, Dv)``, dtype of q
        Gradient of the loss with respect to ``out``.
    q, k, v : arrays
        The forward inputs (see :func:`attention`).
    out : array, shape ``(..., Hq, Lq, Dv)``, dtype of q
        The forward output.
    lse : array, shape ``(..., Hq, Lq)``, float32
        The forward log-sum-exp (``attention(..., return_lse=True)``), any strides.
    causal : bool, default False
        Bottom-right aligned causal mask, as in the forward call.
    scale : float, optional
        As in the forward call; defaults to ``1 / sqrt(D)``.
    window, softcap, alibi_slopes : optional
        As in the forward call (see :func:`attention`). The softcap's derivative,
        ``1 - tanh^2``, multiplies the score gradients; the ALiBi bias is constant.
    deterministic : bool, default False
        Bit-identical results on every run. The default accumulates dq with float32
        atomics, whose order varies between runs; deterministic mode computes dq in a
        separate pass over the key tiles in a fixed order instead, which recomputes
        the scores (about 1.4x the matrix work: seven products per tile pair, not five).
    dq, dk, dv : arrays, optional
        Where to write the gradients: shapes of q, k and v, dtype of q, any strides with
        a contiguous last dimension.

    Returns
    -------
    dq, dk, dv : arrays with the shapes of q, k and v, dtype of q
        For grouped-query attention, dk and dv are summed over the query heads of each
        group. A query row that sees no key gets a zero dq row.

    Notes
    -----
    Cost: about 2.5 times the forward pass's FLOPs (five matrix products instead of
    two), plus a small preprocess (``delta = rowsum(dout * out)``) and, by default, a
    float32 buffer of ``4 * Hq * Lq * D`` bytes per batch element for dq.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 96, 64)).astype(np.float16) for _ in range(3))
    >>> o, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    >>> dout = rng.standard_normal(o.shape).astype(np.float16)
    >>> dq, dk, dv = cuflash.attention_backward(dout, q, k, v, o, lse, causal=True)
    >>> dq.shape, dk.dtype
    ((2, 4, 96, 64), dtype('float16'))
    """
    grads = {n: x for n, x in (("dq", dq), ("dk", dk), ("dv", dv)) if x is not None}
    xp = _array_module(dout=dout, q=q, k=k, v=v, out=out, lse=lse, **grads)
    causal = _check_bool("causal", causal)
    deterministic = _check_bool("deterministic", deterministic)
    _check_dtypes(q, k, v)
    D, Dv = _check_shapes(q, k, v)
    out_shape = q.shape[:-1] + (Dv,)
    for name, x in (("dout", dout), ("out", out)):
        if x.shape != out_shape:
            raise ValueError(f"{name} must have shape {out_shape} (q's with v's head dim), "
                             f"got {x.shape}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must be {q.dtype} (the dtype of q), got {x.dtype}")
    if lse.shape != q.shape[:-1]:
        raise ValueError(f"lse must have shape {q.shape[:-1]}, got {lse.shape}")
    if lse.dtype != np.float32:
        raise TypeError(f"lse.dtype must be float32, got {lse.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v), ("dout", dout), ("out", out)):
        _check_last_dim_contiguous(name, x)
    scale = _check_scale(scale, D)
    dq = _check_output("dq", dq, xp, q.shape, q.dtype)
    dk = _check_output("dk", dk, xp, k.shape, q.dtype)
    dv = _check_output("dv", dv, xp, v.shape, q.dtype)
    _check_no_overlap({"dq": dq, "dk": dk, "dv": dv},
                      {"dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": lse})
    opts = _options.parse(xp, q, causal, options)

    if xp is np and opts.dropout_p:
        grads = _reference.attention_backward_naive(dout, q, k, v, causal=causal, scale=scale,
                                                    **opts.reference_kwargs(),
                                                    **_reference_dropout(opts, q, k))
        return tuple(_into(given, g, q.dtype) for given, g in zip((dq, dk, dv), grads))
    if xp is np:
        grads = _reference.attention_backward_tiled(dout, q, k, v, out, lse, causal=causal,
                                                    scale=scale, **opts.reference_kwargs())
        return tuple(_into(given, g, q.dtype) for given, g in zip((dq, dk, dv), grads))
    return _gpu_backward(xp, dout, q, k, v, out, lse, dq, dk, dv, causal=causal, scale=scale,
                         deterministic=deterministic, opts=opts)


def _into(given, value, dtype):
    """The NumPy path's result: ``value`` in ``dtype``, written into ``given`` if any."""
    if given is None:
        return value.astype(dtype)
    given[...] = value.astype(dtype)
    return given


def _gradient_arrays(cp, q, k, v, dq, dk, dv):
    """The caller's dq, dk, dv, or new arrays with the shapes of q, k, v (q's dtype)."""
    return tuple(cp.empty(x.shape, q.dtype) if g is None else g
                 for g, x in ((dq, q), (dk, k), (dv, v)))


def _gpu_backward(cp, dout, q, k, v, out, lse, dq, dk, dv, *, causal, scale, deterministic,
                  opts=_options.NONE):
    from . import _dispatch

    _check_device(cp, dout=dout, q=q, k=k, v=v, out=out, lse=lse, dq=dq, dk=dk, dv=dv,
                  alibi_slopes=opts.alibi_slopes)
    dq, dk, dv = _gradient_arrays(cp, q, k, v, dq, dk, dv)
    if dq.size + dk.size + dv.size == 0:
        return dq, dk, dv
    lead = None if q.ndim == 2 else q.shape[:-3]
    arrays = [(dout, 3), (q, 3), (k, 3), (v, 3), (out, 3), (lse, 2), (dq, 3), (dk, 3), (dv, 3)]
    if opts.alibi_slopes is not None:
        arrays.append((opts.alibi_slopes, 1))
    for batch0, views in _batched_views(lead, arrays):
        _dispatch.backward(*views[:9], causal=causal, scale=scale, deterministic=deterministic,
                           options=opts, alibi_slopes=views[9] if len(views) > 9 else None,
                           batch0=batch0)
    return dq, dk, dv
