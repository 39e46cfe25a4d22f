"""JAX adapter: :func:`attention`, differentiable (``jax.custom_vjp``), under ``jax.jit``.

    import cuflash.jax
    out = cuflash.jax.attention(q, k, v, causal=True)       # q: (B, H, L, D) jax.Array
    grads = jax.grad(lambda q: cuflash.jax.attention(q, k, v).sum())(q)

The forward and backward kernels run inside XLA's computation through
``jax.experimental.buffer_callback``: XLA allocates the outputs, the callback receives
the device buffers (borrowed as CuPy arrays, no copy) and XLA's CUDA stream, and
launches the kernels on that stream. See ``docs/interop.md``.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from . import _api, _interop, _options, _varlen


def _borrow(buf):
    return _interop.borrow(buf, np.dtype(buf.dtype))


def _option_kwargs(window, softcap, slopes, dropout=(0.0, 0)) -> dict:
    """cuflash.attention's keyword options; ``slopes`` is a borrowed buffer or None,
    ``dropout`` the static ``(dropout_p, seed)``."""
    opts = {}
    if dropout[0]:
        opts["dropout_p"], opts["seed"] = dropout
    if window != (-1, -1):
        opts["window"] = window
    if softcap:
        opts["softcap"] = softcap
    if slopes is not None:
        opts["alibi_slopes"] = _borrow(slopes)
    return opts


def _check_slopes(alibi_slopes):
    if alibi_slopes is not None and getattr(alibi_slopes, "dtype", None) != jnp.float32:
        raise TypeError("alibi_slopes must be a float32 jax.Array")


def _forward(q, k, v, slopes, causal, scale, window, softcap, dropout):
    def run(ctx, outs, q, k, v, *slopes):
        out, lse = outs
        with _interop.on_stream(ctx.stream, _device_id(q)):
            _api.attention_into(_borrow(q), _borrow(k), _borrow(v), _borrow(out),
                                _borrow(lse), causal=causal, scale=scale,
                                **_option_kwargs(window, softcap, slopes[0] if slopes else None,
                                                 dropout))

    shapes = (jax.ShapeDtypeStruct(q.shape[:-1] + (v.shape[-1],), q.dtype),
              jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    extra = () if slopes is None else (slopes,)
    return buffer_callback(run, shapes)(q, k, v, *extra)


def _backward(dout, q, k, v, out, lse, slopes, causal, scale, deterministic, window, softcap,
              dropout):
    def run(ctx, grads, dout, q, k, v, out, lse, *slopes):
        dq, dk, dv = grads
        with _interop.on_stream(ctx.stream, _device_id(q)):
            _api.attention_backward(*(_borrow(x) for x in (dout, q, k, v, out, lse)),
                                    causal=causal, scale=scale, deterministic=deterministic,
                                    dq=_borrow(dq), dk=_borrow(dk), dv=_borrow(dv),
                                    **_option_kwargs(window, softcap,
                                                     slopes[0] if slopes else None, dropout))

    shapes = tuple(jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v))
    extra = () if slopes is None else (slopes,)
    return buffer_callback(run, shapes)(dout, q, k, v, out, lse, *extra)


def _device_id(buf) -> int:
    return buf.__dlpack_device__()[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _attention(q, k, v, slopes, causal, scale, deterministic, window, softcap, dropout):
    return _forward(q, k, v, slopes, causal, scale, window, softcap, dropout)


def _attention_fwd(q, k, v, slopes, causal, scale, deterministic, window, softcap, dropout):
    out, lse = _forward(q, k, v, slopes, causal, scale, window, softcap, dropout)
    return (out, lse), (q, k, v, out, lse, slopes)


def _attention_bwd(causal, scale, deterministic, window, softcap, dropout, residuals,
                   cotangents):
    q, k, v, out, lse, slopes = residuals
    dout, _ = cotangents  # lse is not differentiated (as in FlashAttention)
    dq, dk, dv = _backward(dout.astype(q.dtype), q, k, v, out, lse, slopes, causal, scale,
                           deterministic, window, softcap, dropout)
    # the ALiBi slopes are constants here: zero cotangent
    return dq, dk, dv, None if slopes is None else jnp.zeros_like(slopes)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False, deterministic: bool = False,
              window: Optional[tuple[int, int]] = None, softcap: float = 0.0,
              alibi_slopes=None, dropout_p: float = 0.0, seed: Optional[int] = None):
    """:func:`cuflash.attention` on JAX GPU arrays, differentiable in q, k and v.

    Parameters
    ----------
    q, k, v : jax.Array on a CUDA device, float16, bfloat16 or float32 (tf32 products)
        ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``; ``Hq % Hk == 0``
        is grouped-query attention. (``jax.nn.dot_product_attention`` takes
        ``(B, L, H, D)``: swap axes -3 and -2.)
    causal, scale, deterministic
        As in :func:`cuflash.attention` and :func:`cuflash.attention_backward`.
    return_lse : bool
        Also return the float32 log-sum-exp ``(..., Hq, Lq)`` (its gradient is not
        propagated).
    window, softcap : optional, static
        Sliding window ``(left, right)`` and score softcap, as in :func:`cuflash.attention`.
    alibi_slopes : jax.Array, float32, ``(Hq,)`` or ``(..., Hq)``, optional
        ALiBi slopes; treated as constants (zero gradient).
    dropout_p, seed : float, int, optional, static
        Dropout on the probabilities, as in :func:`cuflash.attention` (a seed is required
        with ``dropout_p > 0``). Both are static: under ``jax.jit`` a new seed traces the
        function again (the kernels are not recompiled).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, cuflash.jax  # doctest: +SKIP
    >>> q = k = v = jnp.ones((2, 8, 512, 64), jnp.bfloat16)  # doctest: +SKIP
    >>> out = jax.jit(cuflash.jax.attention, static_argnames="causal")(q, k, v, causal=True)  # doctest: +SKIP
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")
        if x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
            raise TypeError(f"{name}.dtype must be float16, bfloat16 or float32, got {x.dtype}")
    scale, window, softcap = _interop.check_call(q, k, v, causal, scale, deterministic,
                                                 window, softcap)  # at trace time
    _check_slopes(alibi_slopes)
    dropout = _options.check_dropout(dropout_p, seed)
    out, lse = _attention(q, k, v, alibi_slopes, causal, scale, deterministic, window, softcap,
                          dropout)
    return (out, lse) if return_lse else out


# --- packed variable-length sequences ------------------------------------------------------


def _varlen_forward(q, k, v, cu_q, cu_k, slopes, static):
    max_q, max_k, causal, scale, _, window, softcap, dropout = static

    def run(ctx, outs, q, k, v, cu_q, cu_k, *slopes):
        out, lse = outs
        with _interop.on_stream(ctx.stream, _device_id(q)):
            _varlen.attention_varlen_into(
                _borrow(q), _borrow(k), _borrow(v), _borrow(cu_q), _borrow(cu_k), max_q, max_k,
                _borrow(out), _borrow(lse), causal=causal, scale=scale,
                **_option_kwargs(window, softcap, slopes[0] if slopes else None, dropout))

    shapes = (jax.ShapeDtypeStruct(q.shape[:2] + v.shape[-1:], q.dtype),
              jax.ShapeDtypeStruct((q.shape[1], q.shape[0]), jnp.float32))
    extra = () if slopes is None else (slopes,)
    return buffer_callback(run, shapes)(q, k, v, cu_q, cu_k, *extra)


def _varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, slopes, static):
    max_q, max_k, causal, scale, deterministic, window, softcap, dropout = static

    def run(ctx, grads, dout, q, k, v, out, lse, cu_q, cu_k, *slopes):
        dq, dk, dv = grads
        with _interop.on_stream(ctx.stream, _device_id(q)):
            _varlen.attention_varlen_backward(
                *(_borrow(x) for x in (dout, q, k, v, out, lse, cu_q, cu_k)), max_q, max_k,
                causal=causal, scale=scale, deterministic=deterministic, dq=_borrow(dq),
                dk=_borrow(dk), dv=_borrow(dv),
                **_option_kwargs(window, softcap, slopes[0] if slopes else None, dropout))

    shapes = tuple(jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v))
    extra = () if slopes is None else (slopes,)
    return buffer_callback(run, shapes)(dout, q, k, v, out, lse, cu_q, cu_k, *extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention_varlen(q, k, v, cu_q, cu_k, slopes, static):
    return _varlen_forward(q, k, v, cu_q, cu_k, slopes, static)


def _attention_varlen_fwd(q, k, v, cu_q, cu_k, slopes, static):
    out, lse = _varlen_forward(q, k, v, cu_q, cu_k, slopes, static)
    return (out, lse), (q, k, v, out, lse, cu_q, cu_k, slopes)


def _attention_varlen_bwd(static, residuals, cotangents):
    q, k, v, out, lse, cu_q, cu_k, slopes = residuals
    dout, _ = cotangents
    dq, dk, dv = _varlen_backward(dout.astype(q.dtype), q, k, v, out, lse, cu_q, cu_k, slopes,
                                  static)
    no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  (integer inputs)
    return (dq, dk, dv, no_grad(cu_q), no_grad(cu_k),
            None if slopes is None else jnp.zeros_like(slopes))


_attention_varlen.defvjp(_attention_varlen_fwd, _attention_varlen_bwd)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     *, causal: bool = False, scale: Optional[float] = None,
                     return_lse: bool = False, deterministic: bool = False,
                     window: Optional[tuple[int, int]] = None, softcap: float = 0.0,
                     alibi_slopes=None, dropout_p: float = 0.0, seed: Optional[int] = None):
    """:func:`cuflash.attention_varlen` on JAX GPU arrays, differentiable in q, k and v.
    Options as in :func:`attention` (``dropout_p`` and ``seed`` static).

    ``q``: ``(total_q, Hq, D)``; ``k``, ``v``: ``(total_k, Hk, D/Dv)``; ``cu_seqlens_*``:
    int32 ``(batch + 1,)`` arrays; ``max_seqlen_*`` static ints. The prefix sums are checked
    inside the callback (a copy to the host on XLA's stream).

    Examples
    --------
    >>> cu = jnp.asarray([0, 100, 356], jnp.int32)  # doctest: +SKIP
    >>> out = cuflash.jax.attention_varlen(q, k, v, cu, cu, 256, 256, causal=True)  # doctest: +SKIP
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "dtype") or x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
            raise TypeError(f"{name} must be a float16, bfloat16 or float32 jax.Array")
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if getattr(x, "dtype", None) != jnp.int32:
            raise TypeError(f"{name} must be an int32 jax.Array")
    if q.ndim != 3:
        raise ValueError(f"q must have shape (total, heads, head_dim), got {q.shape}")
    scale, window, softcap = _interop.check_flags(causal, scale, deterministic, window,
                                                  softcap, q.shape[-1])
    _check_slopes(alibi_slopes)
    static = (int(max_seqlen_q), int(max_seqlen_k), causal, scale, deterministic, window,
              softcap, _options.check_dropout(dropout_p, seed))
    out, lse = _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, static)
    return (out, lse) if return_lse else out
