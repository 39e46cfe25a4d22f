"""Borrowing other frameworks' GPU buffers as CuPy arrays, with no copy, and running on
their streams. Used by the PyTorch and JAX adapters (:mod:`cuflash.torch`,
:mod:`cuflash.jax`)."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from . import _api, _options

try:
    import ml_dtypes

    _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _BFLOAT16 = None


def _cupy():
    import cupy

    return cupy


def check_call(q, k, v, causal, scale, deterministic, window=None, softcap=0.0):
    """The adapters' checks before tracing or launching: the shapes with
    :func:`cuflash.attention`'s messages (``.shape`` and ``.ndim`` are all they read), then
    :func:`check_flags`. Returns ``(scale, window, softcap)``."""
    head_dim, _ = _api._check_shapes(q, k, v)
    return check_flags(causal, scale, deterministic, window, softcap, head_dim)


def check_flags(causal, scale, deterministic, window, softcap, head_dim):
    """The flags, the scale, the window and the softcap of an adapter call. Returns
    ``(scale, window, softcap)``: the scale (default ``1 / sqrt(head_dim)``), the window as
    a pair (-1: unbounded) and the softcap as a float."""
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return (_api._check_scale(scale, head_dim), _options._check_window(window),
            _options._check_softcap(softcap))


def borrow(x, dtype=None):
    """A CuPy view of device buffer ``x`` (DLPack first, else the CUDA array interface),
    sharing its memory. ``dtype`` (a NumPy dtype) reinterprets the elements, for buffers
    whose DLPack export CuPy cannot type (bfloat16 through an int16 view)."""
    cp = _cupy()
    try:
        arr = cp.from_dlpack(x)
    except (TypeError, ValueError, BufferError, RuntimeError):
        iface = x.__cuda_array_interface__
        shape = tuple(iface["shape"])
        item = np.dtype(dtype).itemsize if dtype is not None else np.dtype(iface["typestr"]).itemsize
        strides = iface.get("strides")
        strides = tuple(strides) if strides else None
        extent = item * (max((n - 1) * (s // item) for n, s in zip(shape, strides)) + 1
                         if strides and all(shape) else int(np.prod(shape)))
        mem = cp.cuda.UnownedMemory(iface["data"][0], extent, x)
        arr = cp.ndarray(shape, dtype or np.dtype(iface["typestr"]),
                         cp.cuda.MemoryPointer(mem, 0), strides=strides)
    return arr if dtype is None or arr.dtype == dtype else arr.view(dtype)


_streams: dict = {}


def _external_stream(stream_ptr: int, device_id: int):
    """CuPy's handle of a foreign stream, made once per (stream, device): the handle owns
    nothing, and making one per call costs a deprecation warning each time."""
    stream = _streams.get((stream_ptr, device_id))
    if stream is None:
        cp = _cupy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # wants __cuda_stream__
            stream = cp.cuda.ExternalStream(stream_ptr, device_id)
        if len(_streams) > 256:  # streams come and go in long programs
            _streams.clear()
        _streams[(stream_ptr, device_id)] = stream
    return stream


@contextlib.contextmanager
def on_stream(stream_ptr: int, device_id: int):
    """Make CUDA stream ``stream_ptr`` of device ``device_id`` CuPy's current stream."""
    cp = _cupy()
    with cp.cuda.Device(device_id), _external_stream(stream_ptr, device_id):
        yield
