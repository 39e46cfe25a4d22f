"""The attention options of ``../shared/API.md``: ``window``, ``softcap``, ``alibi_slopes``,
``dropout_p`` and ``seed``.

:func:`parse` checks them, with errors that name the argument, and folds ``causal`` into
the window. The result says which kernel family runs them (:attr:`Options.kernel`) and
what the kernels receive (:meth:`Options.window_args`, :meth:`Options.softcap_args`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from . import _dropout

_NAMES = ("window", "softcap", "alibi_slopes", "dropout_p", "seed")


@dataclasses.dataclass(frozen=True)
class Options:
    """Checked options. ``window`` is the effective ``(left, right)`` after ``causal`` is
    folded in (-1: unbounded); ``alibi_slopes`` is float32 of shape ``q.shape[:-2]``
    (batch dims and Hq; a view or a small copy), or None. ``dropout_p`` in [0, 1) with its
    ``seed`` (cuflash/_dropout.py)."""

    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: object = None
    dropout_p: float = 0.0
    seed: int = 0

    @property
    def causal(self) -> bool:
        """The mask is exactly bottom-right causal, ``(-1, 0)``."""
        return self.window == (-1, 0)

    @property
    def local(self) -> bool:
        """A window other than none and causal."""
        return self.window not in ((-1, -1), (-1, 0))

    @property
    def kernel(self) -> bool:
        """Whether the options kernels (kernels/scores.cuh, a windowed mask) must run."""
        return (self.local or self.softcap > 0 or self.alibi_slopes is not None
                or self.dropout_p > 0)

    def dropout_args(self) -> tuple[int, float, int]:
        """``(threshold, 1 / (1 - p), seed)`` for the kernels (threshold 0: no dropout)."""
        if not self.dropout_p:
            return 0, 1.0, 0
        return _dropout.threshold(self.dropout_p), 1.0 / (1.0 - self.dropout_p), self.seed

    def window_args(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """``(left, right)`` for the kernels: an unbounded or oversized side is clamped to
        ``seqlen_k`` (left) or ``seqlen_q`` (right), which hides nothing more."""
        left, right = self.window
        left = seqlen_k if left < 0 else min(left, seqlen_k)
        right = seqlen_q if right < 0 else min(right, seqlen_q)
        return left, right

    def softcap_args(self, scale: float) -> tuple[float, float]:
        """``(scale / c, c * log2(e))``, or ``(0, 0)`` without a softcap."""
        if not self.softcap:
            return 0.0, 0.0
        return scale / self.softcap, self.softcap * math.log2(math.e)

    def reference_kwargs(self) -> dict:
        """The same options for :mod:`cuflash._reference` (causal folded into window)."""
        return {"window": self.window, "softcap": self.softcap,
                "alibi_slopes": self.alibi_slopes}

    def reference_dropout(self, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> dict:
        """``dropout_p`` and the keep mask ``(batch, heads, seqlen_q, seqlen_k)`` for the
        reference, or nothing without dropout."""
        if not self.dropout_p:
            return {}
        return {"dropout_p": self.dropout_p,
                "dropout_mask": _dropout.keep_mask(self.seed, self.dropout_p, batch, heads,
                                                   seqlen_q, seqlen_k)}


NONE = Options()


def parse(xp, q, causal: bool, options: dict, heads_shape=None) -> Options:
    """Check ``options`` (the ``**options`` of a public call) against q; ``causal`` is
    already a checked bool. ``heads_shape``: the batch and head dims that ALiBi slopes
    broadcast to (default ``q.shape[:-2]``; packed sequences pass ``(batch, Hq)``)."""
    if not options and not causal:
        return NONE
    unknown = sorted(set(options) - set(_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)} (options are "
                        f"{', '.join(_NAMES)})")
    left, right = _check_window(options.get("window"))
    if causal:
        right = 0 if right < 0 else min(right, 0)
    dropout_p, seed = check_dropout(options.get("dropout_p", 0.0), options.get("seed"))
    return Options((left, right), _check_softcap(options.get("softcap", 0.0)),
                   _check_slopes(xp, q, options.get("alibi_slopes"), heads_shape),
                   dropout_p, seed)


def check_dropout(dropout_p, seed) -> tuple[float, int]:
    """``(dropout_p, seed)``: p a real number in [0, 1); a seed (an int in [0, 2**64)) is
    required with p > 0, since the backward pass must be given the same one."""
    if dropout_p is None:
        dropout_p = 0.0
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is None:
        if dropout_p > 0:
            raise ValueError("seed is required with dropout_p > 0 (an int in [0, 2**64); "
                             "pass the same seed to the backward call)")
        return dropout_p, 0
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return dropout_p, int(seed)


def _check_window(window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a (left, right) pair of ints, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window {side} must be >= 0, or -1 for unbounded, got {w}")
        out.append(int(w))
    return out[0], out[1]


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0 is off), got {softcap}")
    return softcap


def _check_slopes(xp, q, slopes, heads_shape=None):
    """float32 slopes broadcast to ``q.shape[:-2]`` (batch dims + Hq; ``(1,)`` for 2-D q,
    which also takes a 0-d array)."""
    if slopes is None:
        return None
    if not isinstance(slopes, xp.ndarray):
        raise TypeError(f"alibi_slopes must be a {xp.__name__}.ndarray like q, "
                        f"got {type(slopes).__name__}")
    if slopes.dtype != np.float32:
        raise TypeError(f"alibi_slopes.dtype must be float32, got {slopes.dtype}")
    target = heads_shape or (q.shape[:-2] if q.ndim > 2 else (1,))
    if q.ndim == 2 and slopes.ndim == 0:
        slopes = slopes.reshape(1)
    if slopes.ndim == 0 or slopes.shape[-1] != target[-1] or slopes.ndim > len(target):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = {target[-1:]} or (..., Hq) "
                         f"broadcasting to {target}, got {slopes.shape}")
    try:
        view = xp.broadcast_to(slopes, target)
    except ValueError:
        raise ValueError(f"alibi_slopes of shape {slopes.shape} does not broadcast to q's "
                         f"batch and head dims {target}") from None
    if slopes.ndim == 1 and len(target) <= 2 and slopes.strides[-1] == 4:
        return view  # (B, Hq) with batch stride 0: no copy
    return xp.ascontiguousarray(view)  # B * Hq floats
