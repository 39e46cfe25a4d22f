"""PyTorch adapter: :func:`attention`, differentiable, zero-copy, on torch's stream.

    import cuflash.torch
    out = cuflash.torch.attention(q, k, v, causal=True)      # q: (B, H, L, D) CUDA tensor
    out.sum().backward()

Under ``torch.compile`` the forward and backward passes are ``torch.library`` custom ops
(``cuflash::attention_fwd`` and ``cuflash::attention_bwd``) with fake (meta)
implementations and a registered autograd formula, so they trace without graph breaks. In
eager mode the same implementation runs through a ``torch.autograd.Function``, which costs
less host time per call.
Inputs are borrowed through DLPack, outputs are allocated by torch's caching allocator,
and the kernels are launched on ``torch.cuda.current_stream()``. See ``docs/interop.md``.
"""

from typing import Optional

import torch
import torch.utils.dlpack

from . import _api, _interop, _options, _varlen

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Capsule:
    """Hands an already exported DLPack capsule to ``cupy.from_dlpack``."""

    __slots__ = ("capsule", "device")

    def __init__(self, t: torch.Tensor):
        # torch's C exporter, not Tensor.__dlpack__: no producer/consumer stream handshake
        # (the kernels run on torch's current stream, so ordering holds; the handshake
        # records and waits on an event per tensor whenever CuPy names that stream
        # differently) and a few microseconds instead of ~50 per tensor.
        self.capsule = torch.utils.dlpack.to_dlpack(t)
        self.device = (2, t.device.index)  # kDLCUDA

    def __dlpack__(self, stream=None, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return self.device


def _cp(t: torch.Tensor):
    """A CuPy view of CUDA tensor ``t`` through DLPack: same memory, shape and strides."""
    t = t.detach()  # DLPack refuses tensors that require grad; detach() is a view
    if t.dtype == torch.bfloat16:  # CuPy types bf16 through ml_dtypes: go through int16
        return _interop.borrow(_Capsule(t.view(torch.int16)), _interop._BFLOAT16)
    return _interop.borrow(_Capsule(t))


def _stream(t: torch.Tensor):
    return _interop.on_stream(torch.cuda.current_stream(t.device).cuda_stream, t.device.index)


def _option_kwargs(window, softcap, alibi_slopes, dropout_p=0.0, seed=0) -> dict:
    """The keyword options of cuflash.attention, from the ops' flat arguments (the seed as
    the ops carry it, a signed 64-bit int: see _signed_seed)."""
    opts = {}
    if dropout_p:
        opts["dropout_p"], opts["seed"] = dropout_p, seed % 2**64
    if tuple(window) != (-1, -1):
        opts["window"] = tuple(window)
    if softcap:
        opts["softcap"] = softcap
    if alibi_slopes is not None:
        opts["alibi_slopes"] = _cp(alibi_slopes)
    return opts


def _signed_seed(dropout_p, seed) -> int:
    """The dropout seed as a torch op's ``int`` (signed 64 bits; the kernels read the same
    bits as unsigned). Without a seed, one is drawn from torch's default CPU generator, so
    ``torch.manual_seed`` makes a run reproducible."""
    dropout_p, seed = _options.check_dropout(
        dropout_p, seed if seed is not None or not dropout_p
        else int(torch.randint(0, 2**63 - 1, ()).item()))
    return seed - 2**64 if seed >= 2**63 else seed


def _check_slopes(alibi_slopes, device):
    """None, or the ALiBi slopes as a float32 tensor on ``device``, detached (constants)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        raise TypeError("alibi_slopes must be a float32 torch.Tensor")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on {device}, got {alibi_slopes.device}")
    return alibi_slopes.detach()


def _forward_impl(q, k, v, causal, scale, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                  dropout_p=0.0, seed=0):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    with _stream(q):
        _api.attention_into(_cp(q), _cp(k), _cp(v), _cp(out), _cp(lse), causal=causal,
                            scale=scale,
                            **_option_kwargs(window, softcap, alibi_slopes, dropout_p, seed))
    return out, lse


def _backward_impl(dout, q, k, v, out, lse, causal, scale, deterministic, window=(-1, -1),
                   softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0):
    if dout.dim() and dout.stride(-1) != 1:
        # autograd may hand over a broadcast gradient (stride 0, e.g. from .sum()); the
        # kernels read rows of contiguous elements
        dout = dout.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with _stream(q):
        _api.attention_backward(_cp(dout), _cp(q), _cp(k), _cp(v), _cp(out), _cp(lse),
                                causal=causal, scale=scale, deterministic=deterministic,
                                dq=_cp(dq), dk=_cp(dk), dv=_cp(dv),
                                **_option_kwargs(window, softcap, alibi_slopes, dropout_p,
                                                 seed))
    return dq, dk, dv


# --- custom ops: what torch.compile traces (fake implementations give the shapes) -------


@torch.library.custom_op("cuflash::attention_fwd", mutates_args=(), device_types="cuda")
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float, deterministic: bool, window: list[int], softcap: float,
                   alibi_slopes: Optional[torch.Tensor], dropout_p: float, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, causal, scale, window, softcap, alibi_slopes, dropout_p, seed)


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, deterministic, window, softcap, alibi_slopes, dropout_p, seed):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)),
            q.new_empty(q.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("cuflash::attention_bwd", mutates_args=(), device_types="cuda")
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                   deterministic: bool, window: list[int], softcap: float,
                   alibi_slopes: Optional[torch.Tensor], dropout_p: float, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, causal, scale, deterministic, window,
                          softcap, alibi_slopes, dropout_p, seed)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, deterministic, window, softcap, alibi_slopes,
      dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_N_FLAGS = 8  # the non-tensor-gradient inputs after q, k, v


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, deterministic, window, softcap, alibi_slopes, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
    ctx.window, ctx.softcap, ctx.dropout_p, ctx.seed = window, softcap, dropout_p, seed
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale,
                                ctx.deterministic, ctx.window, ctx.softcap, alibi_slopes,
                                ctx.dropout_p, ctx.seed)
    return (dq, dk, dv) + (None,) * _N_FLAGS


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- eager mode: the same implementation through autograd.Function -----------------------
# A custom op's Python dispatch costs about a millisecond a call in eager mode (measured
# with tools/probe_overhead.py); an autograd.Function costs tens of microseconds.


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, deterministic, window, softcap, alibi_slopes,
                dropout_p, seed):
        out, lse = _forward_impl(q, k, v, causal, scale, window, softcap, alibi_slopes,
                                 dropout_p, seed)
        _setup_context(ctx, (q, k, v, causal, scale, deterministic, window, softcap,
                             alibi_slopes, dropout_p, seed), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = _backward_impl(dout, q, k, v, out, lse, ctx.causal, ctx.scale,
                                    ctx.deterministic, ctx.window, ctx.softcap, alibi_slopes,
                                    ctx.dropout_p, ctx.seed)
        return (dq, dk, dv) + (None,) * _N_FLAGS


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, return_lse: bool = False,
              deterministic: bool = False, window: Optional[tuple[int, int]] = None,
              softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, seed: Optional[int] = None):
    """:func:`cuflash.attention` on torch CUDA tensors, differentiable in q, k and v.

    Parameters
    ----------
    q, k, v : torch.Tensor, CUDA, float16, bfloat16 or float32 (tf32 products)
        ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``, any strides with
        a contiguous last dimension: a ``(B, L, H, D)`` tensor is passed as
        ``x.transpose(1, 2)``, with no copy. ``Hq % Hk == 0`` is grouped-query attention.
    causal : bool
        Bottom-right aligned (equal to torch's ``is_causal`` when ``Lq == Lk``).
    scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    return_lse : bool
        Also return the float32 log-sum-exp ``(..., Hq, Lq)`` (not differentiable).
    deterministic : bool
        Bit-identical gradients on every run (see :func:`cuflash.attention_backward`).
    window, softcap : optional
        Sliding window ``(left, right)`` and score softcap, as in :func:`cuflash.attention`.
    alibi_slopes : torch.Tensor, optional
        float32 CUDA tensor ``(Hq,)`` or ``(..., Hq)``; not differentiated.
    dropout_p, seed : float, int, optional
        Dropout on the probabilities (as in :func:`cuflash.attention`); the backward pass
        reuses the seed. Without a seed, one is drawn from torch's CPU generator
        (``torch.manual_seed`` fixes it). Pass ``dropout_p=0`` for evaluation.

    Returns
    -------
    torch.Tensor ``(..., Hq, Lq, Dv)``, allocated by torch; with ``return_lse``, also lse.

    Examples
    --------
    >>> import torch, cuflash.torch  # doctest: +SKIP
    >>> q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16,
    ...                        requires_grad=True) for _ in range(3))  # doctest: +SKIP
    >>> out = cuflash.torch.attention(q, k, v, causal=True)  # doctest: +SKIP
    >>> out.float().square().sum().backward()  # doctest: +SKIP
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name}.dtype must be torch.float16, torch.bfloat16 or torch.float32, "
                            f"got {x.dtype}")
        if x.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor, got device {x.device}")
    scale, window, softcap = _interop.check_call(q, k, v, causal, scale, deterministic,
                                                 window, softcap)
    alibi_slopes = _check_slopes(alibi_slopes, q.device)
    seed = _signed_seed(dropout_p, seed)
    run = _attention_fwd if torch.compiler.is_compiling() else _Attention.apply
    out, lse = run(q, k, v, causal, scale, deterministic, list(window), softcap, alibi_slopes,
                   float(dropout_p), seed)
    return (out, lse) if return_lse else out


# --- packed variable-length sequences (eager autograd; not a custom op) -------------------


class _AttentionVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, deterministic, window,
                softcap, alibi_slopes, dropout_p, seed):
        out = q.new_empty(q.shape[:2] + v.shape[-1:])
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        with _stream(q):
            _varlen.attention_varlen_into(_cp(q), _cp(k), _cp(v), _cp(cu_q), _cp(cu_k), max_q,
                                          max_k, _cp(out), _cp(lse), causal=causal,
                                          scale=scale,
                                          **_option_kwargs(window, softcap, alibi_slopes,
                                                           dropout_p, seed))
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
        ctx.args = (max_q, max_k, causal, scale, deterministic, window, softcap, dropout_p, seed)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
        max_q, max_k, causal, scale, deterministic, window, softcap, dropout_p, seed = ctx.args
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        with _stream(q):
            _varlen.attention_varlen_backward(
                _cp(dout), _cp(q), _cp(k), _cp(v), _cp(out), _cp(lse), _cp(cu_q), _cp(cu_k),
                max_q, max_k, causal=causal, scale=scale, deterministic=deterministic,
                dq=_cp(dq), dk=_cp(dk), dv=_cp(dv),
                **_option_kwargs(window, softcap, alibi_slopes, dropout_p, seed))
        return (dq, dk, dv) + (None,) * 12


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, scale: Optional[float] = None,
                     return_lse: bool = False, deterministic: bool = False,
                     window: Optional[tuple[int, int]] = None, softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     seed: Optional[int] = None):
    """:func:`cuflash.attention_varlen` on torch CUDA tensors, differentiable in q, k and v
    (eager mode: an ``autograd.Function``, which ``torch.compile`` runs as a graph break).
    Options as in :func:`attention`.

    ``q``: ``(total_q, Hq, D)``; ``k``, ``v``: ``(total_k, Hk, D)``, ``(total_k, Hk, Dv)``;
    ``cu_seqlens_*``: int32 CUDA tensors ``(batch + 1,)``. Returns ``(total_q, Hq, Dv)``
    (and with ``return_lse`` the float32 ``(Hq, total_q)`` log-sum-exp).

    Examples
    --------
    >>> cu = torch.tensor([0, 100, 356], device="cuda", dtype=torch.int32)  # doctest: +SKIP
    >>> out = cuflash.torch.attention_varlen(q, k, v, cu, cu, 256, 256, causal=True)  # doctest: +SKIP
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16 or float32 torch.Tensor")
        if x.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor, got device {x.device}")
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.device != q.device:
            raise TypeError(f"{name} must be an int32 torch.Tensor on {q.device}")
    scale, window, softcap = _interop.check_flags(causal, scale, deterministic, window,
                                                  softcap, q.shape[-1])
    alibi_slopes = _check_slopes(alibi_slopes, q.device)
    seed = _signed_seed(dropout_p, seed)
    out, lse = _AttentionVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, causal, scale, deterministic, window,
                                      softcap, alibi_slopes, float(dropout_p), seed)
    return (out, lse) if return_lse else out
