"""Dropout masks as a pure function of ``(seed, batch, head, i, j)``: the definition that
the kernels follow (kernels/dropout.cuh), and :func:`dropout_mask`, which shows the mask of
a call.

The random bits come from Philox4x32-7 (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC 2011: seven rounds is the fewest that pass BigCrush), keyed by the 64-bit
seed. One call gives 128 bits = eight 16-bit
numbers, which decide eight scores that a GPU thread holds together in the ``mma.sync``
accumulator layout: rows ``i`` and ``i + 8``, columns ``j`` and ``j + 1`` in two 8-column
halves of a 16-column group. Score ``(i, j)`` of ``(batch, head)`` uses

* counter ``(4 * (j // 16) + (j % 8) // 2, i - (i & 8), batch * heads + head, 0)``,
* the 16-bit word ``4 * ((i >> 3) & 1) + 2 * ((j >> 3) & 1) + (j & 1)`` of the output
  (word 2w is the low half of 32-bit output w),

and is kept iff that word is at least ``round(p * 65536)``: the keep rate is ``1 - p`` to
within 2^-17. Kept scores are scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

import numpy as np

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = np.uint64(0xFFFFFFFF)
PHILOX_ROUNDS = 7  # the dropout mask's (kernels/dropout.cuh: kPhiloxRounds)


def philox4x32(counter, key, rounds=PHILOX_ROUNDS):
    """Philox4x32 with ``rounds`` rounds on arrays: ``counter`` is four uint32 arrays
    (broadcastable), ``key`` two; returns four uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint64) & _MASK32 for x in counter]
    k0, k1 = (np.asarray(x, dtype=np.uint64) & _MASK32 for x in key)
    for _ in range(rounds):
        p0 = np.uint64(_M0) * c[0]  # exact: both factors < 2^32
        p1 = np.uint64(_M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(_W0)) & _MASK32
        k1 = (k1 + np.uint64(_W1)) & _MASK32
    return [x.astype(np.uint32) for x in c]


def threshold(p: float) -> int:
    """16-bit threshold for dropout probability ``p`` in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return min(int(round(p * 65536)), 65535)


def keep_mask(seed: int, p: float, batch: int, heads: int, seqlen_q: int,
              seqlen_k: int) -> np.ndarray:
    """Boolean ``(batch, heads, seqlen_q, seqlen_k)``: True where the score is kept.

    Examples
    --------
    >>> m = keep_mask(1234, 0.25, 1, 2, 64, 64)
    >>> m.shape, bool(abs(m.mean() - 0.75) < 0.02)
    ((1, 2, 64, 64), True)
    """
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    b = np.arange(batch, dtype=np.uint64)[:, None, None, None]
    h = np.arange(heads, dtype=np.uint64)[None, :, None, None]
    i = np.arange(seqlen_q, dtype=np.uint64)[None, None, :, None]
    j = np.arange(seqlen_k, dtype=np.uint64)[None, None, None, :]
    counter = (np.uint64(4) * (j >> np.uint64(4)) + ((j & np.uint64(7)) >> np.uint64(1)),
               i - (i & np.uint64(8)),
               b * np.uint64(heads) + h,
               np.zeros((), np.uint64))
    words = philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))
    slot = (np.uint64(4) * ((i >> np.uint64(3)) & np.uint64(1))
            + np.uint64(2) * ((j >> np.uint64(3)) & np.uint64(1)) + (j & np.uint64(1)))
    word = np.choose((slot >> np.uint64(1)).astype(np.intp),
                     [np.broadcast_to(w, np.broadcast(*counter, slot).shape) for w in words])
    half = np.where((slot & np.uint64(1)) == 1, word >> np.uint32(16), word & np.uint32(0xFFFF))
    return half >= threshold(p)


def dropout_mask(q, k, *, dropout_p, seed, transposed=False):
    """The keep mask that ``cuflash.attention(q, k, v, dropout_p=dropout_p, seed=seed)``
    applies, for debugging: True where a probability is kept (and scaled by
    ``1 / (1 - dropout_p)``), False where it is dropped.

    Parameters
    ----------
    q, k : arrays, shapes ``(..., Hq, Lq, D)`` and ``(..., Hk, Lk, D)`` (or 2-D)
        Only their shapes and array module are used.
    dropout_p : float in [0, 1)
    seed : int in [0, 2**64)
    transposed : bool, default False
        CuPy only: compute the mask with the main backward kernel's code path, which holds
        the scores transposed, instead of the forward kernel's. The two must agree (the
        tests check that they do, and that both equal the NumPy definition).

    Returns
    -------
    mask : bool array, shape ``(..., Hq, Lq, Lk)``, on q's device
        Batch element ``b`` (the leading dims flattened) and head ``h`` use the Philox
        counter ``b * Hq + h``. For :func:`cuflash.attention_varlen`, sequence ``b`` uses
        ``mask[b, :, :lq_b, :lk_b]`` of the mask for shapes ``(batch, Hq, max_seqlen, D)``.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q = np.zeros((1, 2, 64, 16), np.float16)
    >>> m = cuflash.dropout_mask(q, q, dropout_p=0.25, seed=7)
    >>> m.shape, bool(abs(m.mean() - 0.75) < 0.03)
    ((1, 2, 64, 64), True)
    """
    from . import _api, _options

    xp = _api._array_module(q=q, k=k)
    p, seed = _options.check_dropout(dropout_p, seed)
    transposed = _api._check_bool("transposed", transposed)
    for name, x in (("q", q), ("k", k)):
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., L, D), got shape "
                             f"{x.shape}")
    heads = q.shape[-3] if q.ndim > 2 else 1
    batch = int(np.prod(q.shape[:-3], dtype=np.int64)) if q.ndim > 3 else 1
    lq, lk = q.shape[-2], k.shape[-2]
    shape = q.shape[:-2] + (lq, lk)
    if xp is np:
        return keep_mask(seed, p, batch, heads, lq, lk).reshape(shape)
    from . import _dispatch

    out = xp.empty((batch * heads, lq, lk), dtype=xp.uint8)
    _dispatch.dropout_mask(out, lq, lk, _options.Options(dropout_p=p, seed=seed), transposed)
    return out.view(xp.bool_).reshape(shape)
