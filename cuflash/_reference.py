"""NumPy reference implementations of scaled dot-product attention.

This module is the ground truth that the CUDA kernels of ``cuflash`` are
tested against.  Everything here is plain NumPy and all arithmetic is done
in float64, whatever the input dtype (float16, float32, float64 or
``ml_dtypes.bfloat16``).

Three implementations of the forward pass are provided:

``attention_naive``
    Materialises the full score matrix, applies the mask, takes a softmax and
    multiplies by ``v``.  This is the definition of the contract.

``attention_tiled_fa2``
    The loop structure of FlashAttention-2 (Dao, 2023): the outer loop runs
    over tiles of ``block_m`` query rows, the inner loop over tiles of
    ``block_n`` keys/values.  Each query tile keeps its running statistics
    ``m_i`` (row maximum of the scores seen so far), ``l_i`` (row sum of
    ``exp(s - m_i)``) and ``o_acc`` (the unnormalised output accumulator) "in
    registers" for the whole inner loop and divides by ``l_i`` once at the
    end.  Key tiles that are fully masked for the whole query tile are not
    visited.

``attention_tiled_fa1``
    The loop order of FlashAttention (Dao et al., 2022): the outer loop runs
    over key/value tiles and the inner loop over query tiles, so ``m_i``,
    ``l_i`` and ``o_acc`` of every query row live "in HBM" between outer
    iterations.  Each (query tile, key tile) block computes its own local
    statistics which are then merged into the running ones.

Both tiled versions rely on the *online softmax* (Milakov & Gimelshein, 2018;
Rabe & Staats, 2021): when the running maximum moves from ``m_old`` to
``m_new`` the previously accumulated ``l_i`` and ``o_acc`` are rescaled by
``alpha = exp(m_old - m_new)``.  A running maximum of ``-inf`` (no visible key
yet) is replaced by a reference of 0 in those exponents, so that
``(-inf) - (-inf)`` and therefore NaN never appears.

Two implementations of the backward pass return ``(dq, dk, dv)``, the
gradients of ``sum(dout * out)``:

``attention_backward_naive``
    The closed form on the full matrices.  With ``P = softmax(S)`` and
    ``O = P V``: ``dV = P^T dO``, ``dP = dO V^T``,
    ``delta_i = sum_c dO_ic O_ic``, ``dS = P * (dP - delta)``,
    ``dQ = scale dS K`` and ``dK = scale dS^T Q``.

``attention_backward_tiled``
    The loop structure of the FlashAttention-2 backward kernel: a
    preprocess computes ``delta`` from the given ``out``; the outer loop runs
    over tiles of ``block_n`` keys/values, each of which keeps its ``dK_j``
    and ``dV_j`` accumulators for the whole inner loop over tiles of
    ``block_m`` query rows.  ``P`` is recomputed from the saved ``lse`` as
    ``exp(S - lse)`` and ``dQ_i`` is accumulated across outer iterations (the
    kernel's atomic adds to HBM).  Query tiles that see no key of the key
    tile are not visited.

Semantics
---------
* ``q``: ``(..., Hq, Lq, D)``, ``k``: ``(..., Hk, Lk, D)``,
  ``v``: ``(..., Hk, Lk, Dv)``; or 2-D ``(Lq, D)``, ``(Lk, D)``, ``(Lk, Dv)``
  without a head axis.  Leading dimensions must be equal.  ``Hq % Hk == 0``
  and query head ``h`` attends with kv head ``h // (Hq // Hk)``
  (grouped-query attention).
* ``s_ij = scale * q_i . k_j`` with ``scale = 1 / sqrt(D)`` by default; then,
  where given, the softcap ``s = c * tanh(s / c)`` and the ALiBi bias
  ``s -= slope_h * |i + Lk - Lq - j|`` (``softcap=``, ``alibi_slopes=``; the
  public API does not take them until the kernels do).
* Query ``i`` sees key ``j`` iff ``visible_mask(Lq, Lk, causal,
  window=window)[i, j]``.  Causal masking is aligned to the bottom-right
  corner: ``j <= i + Lk - Lq``.
* ``lse_i = log(sum_{visible j} exp(s_ij))`` and
  ``out_i = sum_j softmax(s_i)_j v_j``.  A row that sees no key gets
  ``out_i = 0`` and ``lse_i = -inf`` (never NaN, and no NumPy warnings).
* ``dq``, ``dk``, ``dv`` have the shapes of ``q``, ``k``, ``v``; with
  grouped-query attention ``dk`` and ``dv`` are summed over the query heads
  that share a kv head.  A row that sees no key contributes nothing: its
  ``dq`` row is exactly 0.

References
----------
.. [1] T. Dao, D. Y. Fu, S. Ermon, A. Rudra, C. Re, "FlashAttention: Fast and
   Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022.
   arXiv:2205.14135.
.. [2] T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism
   and Work Partitioning", 2023. arXiv:2307.08691.
.. [3] M. N. Rabe, C. Staats, "Self-attention Does Not Need O(n^2) Memory",
   2021. arXiv:2112.05682.
.. [4] M. Milakov, N. Gimelshein, "Online normalizer calculation for
   softmax", 2018. arXiv:1805.02867.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "visible_mask",
    "attention_naive",
    "attention_tiled_fa2",
    "attention_tiled_fa1",
    "attention_backward_naive",
    "attention_backward_tiled",
    "attention_varlen_naive",
    "attention_varlen_backward_naive",
]


# ---------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------


def _resolve_window(causal, window):
    """Return the effective ``(left, right)`` window; negative = unbounded.

    ``causal`` is the window ``(-1, 0)``; when both are given the result is
    their intersection.
    """
    if window is None:
        left, right = -1, -1
    else:
        left, right = (int(w) for w in window)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def visible_mask(Lq, Lk, causal=False, *, window=None):
    """Boolean visibility mask between queries and keys.

    Query ``i`` sees key ``j`` iff
    ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``, where a bound equal
    to -1 is dropped.  ``causal=True`` is the window ``(-1, 0)``, i.e.
    ``j <= i + Lk - Lq`` (bottom-right aligned causal mask).  If both
    ``causal`` and ``window`` are given, their intersection is used.

    Parameters
    ----------
    Lq, Lk : int
        Number of queries and keys (may be 0).
    causal : bool, optional
        Apply the bottom-right aligned causal mask.
    window : tuple of (int, int) or None, optional
        Sliding window ``(left, right)``; -1 means unbounded on that side.
        ``None`` means ``(-1, -1)``.

    Returns
    -------
    numpy.ndarray
        Bool array of shape ``(Lq, Lk)``; ``True`` where the key is visible.
    """
    left, right = _resolve_window(causal, window)
    # diagonal index of (i, j) relative to the bottom-right aligned diagonal
    rel = np.arange(Lk)[None, :] - (np.arange(Lq)[:, None] + (Lk - Lq))
    mask = np.ones((Lq, Lk), dtype=bool)
    if left >= 0:
        mask &= rel >= -left
    if right >= 0:
        mask &= rel <= right
    return mask


def _key_range(r0, r1, Lq, Lk, left, right):
    """Half-open key range ``[lo, hi)`` that query rows ``[r0, r1)`` may see.

    Derived from the mask rule the way a kernel would: the first row's
    leftmost visible key and the last row's rightmost visible key.  Keys
    outside the range are masked for every row of the tile.
    """
    off = Lk - Lq
    lo = 0 if left < 0 else max(0, r0 + off - left)
    hi = Lk if right < 0 else min(Lk, (r1 - 1) + off + right + 1)
    return lo, max(lo, hi)


def _query_range(c0, c1, Lq, Lk, left, right):
    """Half-open query range ``[lo, hi)`` that may see a key of ``[c0, c1)``.

    The transpose of :func:`_key_range`, as used by the backward kernel's
    outer loop over key tiles: row ``i`` sees key ``j`` only if
    ``j - off - right <= i <= j - off + left`` with ``off = Lk - Lq``.  Rows
    outside the range see no key of the tile.  ``(0, 0)`` if none does.
    """
    off = Lk - Lq
    lo = 0 if right < 0 else max(0, c0 - off - right)
    hi = Lq if left < 0 else min(Lq, (c1 - 1) - off + left + 1)
    return (lo, hi) if lo < hi else (0, 0)


# ---------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------


def _split_heads(q, k, v):
    """Upcast to float64, add a head axis to 2-D inputs, expand kv heads.

    Returns
    -------
    q, k, v : numpy.ndarray
        float64 arrays ``(..., Hq, Lq, D)``, ``(..., Hq, Lk, D)``,
        ``(..., Hq, Lk, Dv)`` (k and v repeated to ``Hq`` heads).
    squeeze : bool
        True if the inputs were 2-D and the head axis must be removed from
        the results.
    """
    q = np.asarray(q).astype(np.float64)
    k = np.asarray(k).astype(np.float64)
    v = np.asarray(v).astype(np.float64)
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(
            f"q, k, v must have the same number of dimensions, got "
            f"{q.ndim}, {k.ndim}, {v.ndim}"
        )
    if q.ndim < 2:
        raise ValueError(f"q, k, v must be at least 2-D, got {q.ndim}-D")
    squeeze = q.ndim == 2
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    if not (q.shape[:-3] == k.shape[:-3] == v.shape[:-3]):
        raise ValueError(
            f"leading dimensions differ: q {q.shape[:-3]}, k {k.shape[:-3]}, "
            f"v {v.shape[:-3]}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"head dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"sequence length of k ({k.shape[-2]}) and v ({v.shape[-2]}) differ"
        )
    hq, hk = q.shape[-3], k.shape[-3]
    if v.shape[-3] != hk:
        raise ValueError(
            f"number of heads of k ({hk}) and v ({v.shape[-3]}) differ"
        )
    if hk == 0 or hq % hk != 0:
        if not (hk == 0 and hq == 0):
            raise ValueError(
                f"number of query heads ({hq}) must be a multiple of the "
                f"number of kv heads ({hk})"
            )
    elif hq != hk:
        group = hq // hk
        k = np.repeat(k, group, axis=-3)
        v = np.repeat(v, group, axis=-3)
    return q, k, v, squeeze


def _default_scale(scale, d):
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    return float(scale)


def _check_blocks(block_m, block_n):
    if int(block_m) < 1 or int(block_n) < 1:
        raise ValueError(
            f"block sizes must be positive, got block_m={block_m}, "
            f"block_n={block_n}"
        )
    return int(block_m), int(block_n)


def _safe_ref(m):
    """Replace a running max of -inf by 0 so ``x - ref`` never is NaN."""
    return np.where(np.isneginf(m), 0.0, m)


def _finalise(m_i, l_i, o_acc, squeeze):
    """``out = o_acc / l_i`` and ``lse = m_i + log(l_i)``; empty rows -> 0, -inf."""
    seen = l_i > 0
    out = np.zeros_like(o_acc)
    np.divide(o_acc, l_i[..., None], out=out, where=seen[..., None])
    log_l = np.zeros_like(l_i)
    np.log(l_i, out=log_l, where=seen)
    lse = np.where(seen, m_i + log_l, -np.inf)
    if squeeze:
        out, lse = out[0], lse[0]
    return np.ascontiguousarray(out), np.ascontiguousarray(lse)


class _Scores:
    """The score block ``s_ij`` of query rows ``[r0, r1)`` and keys ``[c0, c1)``.

    ``s = scale * q k^T``, then the softcap ``c * tanh(s / c)`` (``softcap=0`` is
    off), then the ALiBi bias ``-slope * |i + Lk - Lq - j|``, then the mask
    (``-inf`` where a key is not visible). :meth:`block` also returns
    ``d s / d (scale q k^T)``, the softcap's factor in the backward pass
    (``1 - tanh^2``; None without a softcap); the bias is constant in q and k.
    """

    def __init__(self, scale, mask, lq, lk, softcap=0.0, slopes=None):
        self.scale, self.mask, self.off = scale, mask, lk - lq
        self.softcap, self.slopes = softcap, slopes

    def block(self, q_i, k_t, r0, r1, c0, c1):
        s = self.scale * (q_i @ np.swapaxes(k_t, -1, -2))
        jac = None
        if self.softcap:
            t = np.tanh(s / self.softcap)
            s, jac = self.softcap * t, 1.0 - t * t
        if self.slopes is not None:
            dist = np.abs(np.arange(r0, r1)[:, None] + self.off - np.arange(c0, c1)[None, :])
            s = s - self.slopes * dist
        return np.where(self.mask[r0:r1, c0:c1], s, -np.inf), jac


def _check_softcap(softcap):
    softcap = float(softcap)
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    return softcap


def _alibi_slopes(alibi_slopes, lead, squeeze):
    """float64 slopes shaped ``lead + (1, 1)`` (``lead = q.shape[:-2]`` after the head
    axis of 2-D inputs is added), or None. Accepted: shape ``(Hq,)`` or ``(..., Hq)``
    (or ``()`` for 2-D inputs), broadcastable to q's batch and head dims."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes, dtype=np.float64)
    target = lead[1:] if squeeze else lead
    if squeeze and slopes.shape == (1,):  # one head, as cuflash.attention also takes it
        slopes = slopes.reshape(())
    try:
        slopes = np.broadcast_to(slopes, target)
    except ValueError:
        raise ValueError(f"alibi_slopes of shape {slopes.shape} does not broadcast to "
                         f"q's batch and head dims {target}") from None
    if squeeze:
        slopes = slopes[None]
    return slopes[..., None, None]


# ---------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------


def attention_naive(q, k, v, *, causal=False, scale=None, window=None, softcap=0.0,
                    alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """Attention by materialising the full score matrix (ground truth).

    Parameters
    ----------
    q : array_like
        Queries, ``(..., Hq, Lq, D)`` or ``(Lq, D)``.
    k : array_like
        Keys, ``(..., Hk, Lk, D)`` or ``(Lk, D)``; ``Hq % Hk == 0``.
    v : array_like
        Values, ``(..., Hk, Lk, Dv)`` or ``(Lk, Dv)``.
    causal : bool, optional
        Bottom-right aligned causal mask (see :func:`visible_mask`).
    scale : float or None, optional
        Score scale; ``1 / sqrt(D)`` if None.
    window : tuple of (int, int) or None, optional
        Sliding window ``(left, right)``, -1 = unbounded.
    softcap : float, optional
        Scores become ``softcap * tanh(s / softcap)``; 0 (default) is off.
    alibi_slopes : array_like or None, optional
        Per query head (``(Hq,)``) or per batch and head (``(..., Hq)``): the score
        of query ``i`` and key ``j`` gets ``-slope * |i + Lk - Lq - j|``, after the
        softcap.
    dropout_p, dropout_mask : float, array of bool, optional
        Dropout on the probabilities: ``out = (P * mask / (1 - p)) V`` with ``mask``
        broadcastable to ``(..., Hq, Lq, Lk)`` (for example
        :func:`cuflash._dropout.keep_mask`); ``lse`` is that of ``P``, before dropout.

    Returns
    -------
    out : numpy.ndarray
        float64, ``(..., Hq, Lq, Dv)`` (``(Lq, Dv)`` for 2-D inputs).
    lse : numpy.ndarray
        float64, ``(..., Hq, Lq)`` (``(Lq,)`` for 2-D inputs): natural-log
        sum of exp of the visible scores; ``-inf`` for rows that see no key.
    """
    q, k, v, squeeze, _, _, scores = _tiled_setup(q, k, v, causal, scale, window, softcap,
                                                  alibi_slopes)
    lq, lk = q.shape[-2], k.shape[-2]
    s, _ = scores.block(q, k, 0, lq, 0, lk)
    m_i = np.max(s, axis=-1, initial=-np.inf)
    p = np.exp(s - _safe_ref(m_i)[..., None])
    l_i = p.sum(axis=-1)
    o_acc = _dropped(p, dropout_p, dropout_mask, squeeze) @ v
    return _finalise(m_i, l_i, o_acc, squeeze)


def _dropped(p, dropout_p, mask, squeeze):
    """``p * mask / (1 - dropout_p)``, or ``p`` without a mask."""
    if mask is None:
        return p
    mask = np.asarray(mask, dtype=bool)
    return p * ((mask[None] if squeeze else mask) / (1.0 - dropout_p))


def _tiled_setup(q, k, v, causal, scale, window, softcap=0.0, alibi_slopes=None):
    """Shared set-up: float64 heads, scale, window bounds and the score blocks."""
    q, k, v, squeeze = _split_heads(q, k, v)
    scale = _default_scale(scale, q.shape[-1])
    bounds = _resolve_window(causal, window)
    lq, lk = q.shape[-2], k.shape[-2]
    scores = _Scores(scale, visible_mask(lq, lk, causal, window=window), lq, lk,
                     _check_softcap(softcap), _alibi_slopes(alibi_slopes, q.shape[:-2], squeeze))
    return q, k, v, squeeze, scale, bounds, scores


def attention_tiled_fa2(
    q, k, v, *, causal=False, scale=None, window=None, softcap=0.0, alibi_slopes=None,
    block_m=64, block_n=64
):
    """Tiled attention with the FlashAttention-2 loop order.

    Outer loop over query tiles of ``block_m`` rows, inner loop over key/value
    tiles of ``block_n`` columns.  Per query tile the running statistics
    ``m_i``, ``l_i`` and ``o_acc`` are kept for the whole inner loop; when the
    running max moves, ``l_i`` and ``o_acc`` are rescaled by
    ``alpha = exp(m_old - m_new)``.  Key tiles entirely masked for the query
    tile are skipped.  The output is divided by ``l_i`` once at the end and
    ``lse = m_i + log(l_i)``.  All leading dims and heads are processed
    together per tile.

    Parameters
    ----------
    q, k, v, causal, scale, window, softcap, alibi_slopes
        As in :func:`attention_naive`.
    block_m : int, optional
        Query rows per tile.
    block_n : int, optional
        Keys per tile.

    Returns
    -------
    out, lse : numpy.ndarray
        As in :func:`attention_naive`.
    """
    block_m, block_n = _check_blocks(block_m, block_n)
    q, k, v, squeeze, _, (left, right), scores = _tiled_setup(q, k, v, causal, scale, window,
                                                              softcap, alibi_slopes)
    lq, lk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    batch = q.shape[:-2]

    out_m = np.full(batch + (lq,), -np.inf)
    out_l = np.zeros(batch + (lq,))
    out_o = np.zeros(batch + (lq, dv))

    for r0 in range(0, lq, block_m):
        r1 = min(r0 + block_m, lq)
        q_t = q[..., r0:r1, :]
        m_i = np.full(batch + (r1 - r0,), -np.inf)
        l_i = np.zeros(batch + (r1 - r0,))
        o_acc = np.zeros(batch + (r1 - r0, dv))

        lo, hi = _key_range(r0, r1, lq, lk, left, right)
        for c0 in range((lo // block_n) * block_n, hi, block_n):
            c1 = min(c0 + block_n, lk)
            s, _ = scores.block(q_t, k[..., c0:c1, :], r0, r1, c0, c1)

            m_new = np.maximum(m_i, np.max(s, axis=-1, initial=-np.inf))
            ref = _safe_ref(m_new)
            alpha = np.exp(m_i - ref)            # 0 while m_i == -inf
            p = np.exp(s - ref[..., None])        # masked entries -> 0
            l_i = alpha * l_i + p.sum(axis=-1)
            o_acc = alpha[..., None] * o_acc + p @ v[..., c0:c1, :]
            m_i = m_new

        out_m[..., r0:r1] = m_i
        out_l[..., r0:r1] = l_i
        out_o[..., r0:r1, :] = o_acc

    return _finalise(out_m, out_l, out_o, squeeze)


def attention_tiled_fa1(
    q, k, v, *, causal=False, scale=None, window=None, softcap=0.0, alibi_slopes=None,
    block_m=64, block_n=64
):
    """Tiled attention with the FlashAttention(-1) loop order.

    Outer loop over key/value tiles of ``block_n``, inner loop over query
    tiles of ``block_m``.  The per-row statistics ``m_i``, ``l_i`` and the
    unnormalised ``o_acc`` are stored for all query rows between outer
    iterations (as FlashAttention-1 keeps them in HBM).  Each block computes
    its local max ``m_ij``, ``p_ij = exp(s_ij - m_ij)`` and ``l_ij``, which
    are merged into the stored statistics with factors
    ``exp(m_i - m_new)`` and ``exp(m_ij - m_new)``.  Unlike the original
    algorithm, which renormalises ``O`` at every step, the division by
    ``l_i`` is done once at the end.  Blocks entirely masked are skipped.

    Parameters
    ----------
    q, k, v, causal, scale, window
        As in :func:`attention_naive`.
    block_m : int, optional
        Query rows per tile.
    block_n : int, optional
        Keys per tile.

    Returns
    -------
    out, lse : numpy.ndarray
        As in :func:`attention_naive`.
    """
    block_m, block_n = _check_blocks(block_m, block_n)
    q, k, v, squeeze, _, (left, right), scores = _tiled_setup(q, k, v, causal, scale, window,
                                                              softcap, alibi_slopes)
    lq, lk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    batch = q.shape[:-2]

    # "HBM" state for every query row
    m_hbm = np.full(batch + (lq,), -np.inf)
    l_hbm = np.zeros(batch + (lq,))
    o_hbm = np.zeros(batch + (lq, dv))

    for c0 in range(0, lk, block_n):
        c1 = min(c0 + block_n, lk)
        k_t = k[..., c0:c1, :]
        v_t = v[..., c0:c1, :]
        for r0 in range(0, lq, block_m):
            r1 = min(r0 + block_m, lq)
            lo, hi = _key_range(r0, r1, lq, lk, left, right)
            if c1 <= lo or c0 >= hi:
                continue  # block fully masked

            s, _ = scores.block(q[..., r0:r1, :], k_t, r0, r1, c0, c1)
            m_ij = np.max(s, axis=-1, initial=-np.inf)
            p_ij = np.exp(s - _safe_ref(m_ij)[..., None])
            l_ij = p_ij.sum(axis=-1)

            m_i = m_hbm[..., r0:r1]
            m_new = np.maximum(m_i, m_ij)
            ref = _safe_ref(m_new)
            alpha = np.exp(m_i - ref)
            beta = np.exp(m_ij - ref)
            l_hbm[..., r0:r1] = alpha * l_hbm[..., r0:r1] + beta * l_ij
            o_hbm[..., r0:r1, :] = (
                alpha[..., None] * o_hbm[..., r0:r1, :]
                + beta[..., None] * (p_ij @ v_t)
            )
            m_hbm[..., r0:r1] = m_new

    return _finalise(m_hbm, l_hbm, o_hbm, squeeze)


# ---------------------------------------------------------------------------
# Backward pass
# ---------------------------------------------------------------------------


def _as_float64(x, name, shape, squeeze):
    """Upcast ``x`` to float64, add the head axis of 2-D inputs, check its shape."""
    x = np.asarray(x).astype(np.float64)
    if squeeze:
        x = x[None]
    if x.shape != shape:
        n = int(squeeze)
        raise ValueError(f"{name} must have shape {shape[n:]}, got {x.shape[n:]}")
    return x


def _backward_setup(dout, q, k, v, causal, scale, window, softcap, alibi_slopes):
    """:func:`_tiled_setup` plus a float64 ``dout`` and the number of kv heads.

    ``hk`` is counted before :func:`_split_heads` repeats k and v to ``Hq``
    heads; :func:`_finalise_grads` sums the gradients back to it.
    """
    hk = np.shape(k)[-3] if np.ndim(k) > 2 else 1
    q, k, v, squeeze, scale, bounds, scores = _tiled_setup(q, k, v, causal, scale, window,
                                                           softcap, alibi_slopes)
    dout = _as_float64(dout, "dout", q.shape[:-1] + v.shape[-1:], squeeze)
    return dout, q, k, v, squeeze, scale, bounds, scores, hk


def _finalise_grads(dq, dk, dv, hk, squeeze):
    """Sum ``dk``, ``dv`` over each group of query heads; drop the 2-D head axis."""
    hq = dk.shape[-3]
    if hk and hq != hk:
        dk, dv = (
            g.reshape(g.shape[:-3] + (hk, hq // hk) + g.shape[-2:]).sum(axis=-3)
            for g in (dk, dv)
        )
    if squeeze:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return tuple(np.ascontiguousarray(g) for g in (dq, dk, dv))


def attention_backward_naive(dout, q, k, v, *, causal=False, scale=None, window=None,
                             softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """Gradients of attention by the closed form on the full matrices.

    With ``P = softmax(S)`` over the visible keys (``S = scale q k^T``) and
    ``O = P V``, the gradients of ``sum(dout * O)`` are ``dV = P^T dO``,
    ``dQ = scale dS K`` and ``dK = scale dS^T Q``, where
    ``dS = P * (dO V^T - delta)`` and ``delta_i = sum_c dO_ic O_ic`` (the
    softmax Jacobian applied to ``dP = dO V^T``).  With a softcap, ``dS`` is
    multiplied by ``1 - tanh^2(s / c)`` before the two products; the ALiBi bias
    does not depend on q or k.  ``P`` and ``O`` are recomputed here; rows that see
    no key have ``P = 0`` and therefore contribute nothing.

    Parameters
    ----------
    dout : array_like
        Gradient of the loss with respect to the output, ``(..., Hq, Lq, Dv)``
        or ``(Lq, Dv)``.
    q, k, v, causal, scale, window, softcap, alibi_slopes, dropout_p, dropout_mask
        As in :func:`attention_naive`. With dropout (``Z`` the mask, ``r = 1/(1-p)``):
        ``dV = (r P Z)^T dO`` and ``dS = P * (r Z dP - delta)``, where ``delta`` uses the
        dropped output.

    Returns
    -------
    dq, dk, dv : numpy.ndarray
        float64, the shapes of ``q``, ``k`` and ``v``.  With grouped-query
        attention ``dk`` and ``dv`` are summed over the query heads that
        share a kv head.
    """
    dout, q, k, v, squeeze, scale, _, scores, hk = _backward_setup(
        dout, q, k, v, causal, scale, window, softcap, alibi_slopes
    )
    s, jac = scores.block(q, k, 0, q.shape[-2], 0, k.shape[-2])
    m_i = np.max(s, axis=-1, initial=-np.inf)
    p = np.exp(s - _safe_ref(m_i)[..., None])    # masked entries -> 0
    l_i = p.sum(axis=-1, keepdims=True)
    np.divide(p, l_i, out=p, where=l_i > 0)     # empty rows stay 0
    pz = _dropped(p, dropout_p, dropout_mask, squeeze)  # r P Z (P without dropout)
    o = pz @ v

    dv = np.swapaxes(pz, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    delta = np.sum(dout * o, axis=-1, keepdims=True)
    ds = pz * dp - p * delta
    if jac is not None:
        ds *= jac
    dq = scale * (ds @ k)
    dk = scale * (np.swapaxes(ds, -1, -2) @ q)
    return _finalise_grads(dq, dk, dv, hk, squeeze)


def attention_backward_tiled(
    dout, q, k, v, out, lse, *, causal=False, scale=None, window=None, softcap=0.0,
    alibi_slopes=None, block_m=64, block_n=128,
):
    """Tiled attention backward with the FlashAttention-2 loop order.

    A preprocess computes ``delta_i = sum_c dO_ic O_ic`` from the given
    ``out``.  The outer loop runs over key/value tiles of ``block_n`` keys,
    each keeping its ``dK_j`` and ``dV_j`` accumulators for the whole inner
    loop over query tiles of ``block_m`` rows; query tiles that see no key of
    the tile are skipped.  Per block, ``P = exp(S - lse)`` is recomputed from
    the saved ``lse`` (0 where masked and in rows with ``lse = -inf``), then
    ``dV_j += P^T dO_i``, ``dS = P * (dO_i V_j^T - delta_i)``,
    ``dK_j += scale dS^T Q_i`` and ``dQ_i += scale dS K_j`` (``dQ`` lives in
    HBM across outer iterations, as the kernel's atomic adds).  ``out`` and
    ``lse`` are used as given, not recomputed.

    Parameters
    ----------
    dout : array_like
        As in :func:`attention_backward_naive`.
    q, k, v, causal, scale, window, softcap, alibi_slopes
        As in :func:`attention_naive`.
    out, lse : array_like
        The forward results, ``(..., Hq, Lq, Dv)`` and ``(..., Hq, Lq)``, as
        returned by :func:`attention_naive`.
    block_m : int, optional
        Query rows per tile.
    block_n : int, optional
        Keys per tile.

    Returns
    -------
    dq, dk, dv : numpy.ndarray
        As in :func:`attention_backward_naive`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, dout = (rng.standard_normal((2, 9, 4)) for _ in range(4))
    >>> out, lse = attention_naive(q, k[:1], v[:1], causal=True)
    >>> grads = attention_backward_tiled(dout, q, k[:1], v[:1], out, lse,
    ...                                  causal=True, block_m=4, block_n=3)
    >>> [g.shape for g in grads]
    [(2, 9, 4), (1, 9, 4), (1, 9, 4)]
    >>> want = attention_backward_naive(dout, q, k[:1], v[:1], causal=True)
    >>> all(np.allclose(g, w) for g, w in zip(grads, want))
    True
    """
    block_m, block_n = _check_blocks(block_m, block_n)
    dout, q, k, v, squeeze, scale, (left, right), scores, hk = _backward_setup(
        dout, q, k, v, causal, scale, window, softcap, alibi_slopes
    )
    out = _as_float64(out, "out", dout.shape, squeeze)
    lse = _as_float64(lse, "lse", dout.shape[:-1], squeeze)
    lq, lk = q.shape[-2], k.shape[-2]

    delta = np.sum(dout * out, axis=-1)          # preprocess
    live = ~np.isneginf(lse)                     # rows that see some key
    lse_ref = _safe_ref(lse)
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)

    for c0 in range(0, lk, block_n):
        c1 = min(c0 + block_n, lk)
        k_t, v_t = k[..., c0:c1, :], v[..., c0:c1, :]
        dk_t, dv_t = np.zeros_like(k_t), np.zeros_like(v_t)

        lo, hi = _query_range(c0, c1, lq, lk, left, right)
        for r0 in range((lo // block_m) * block_m, hi, block_m):
            r1 = min(r0 + block_m, lq)
            q_i, do_i = q[..., r0:r1, :], dout[..., r0:r1, :]
            s, jac = scores.block(q_i, k_t, r0, r1, c0, c1)
            vis = ~np.isneginf(s) & live[..., r0:r1, None]
            p = np.exp(np.where(vis, s - lse_ref[..., r0:r1, None], -np.inf))

            dv_t += np.swapaxes(p, -1, -2) @ do_i
            dp = do_i @ np.swapaxes(v_t, -1, -2)
            ds = p * (dp - delta[..., r0:r1, None])
            if jac is not None:
                ds *= jac
            dk_t += scale * (np.swapaxes(ds, -1, -2) @ q_i)
            dq[..., r0:r1, :] += scale * (ds @ k_t)

        dk[..., c0:c1, :] = dk_t
        dv[..., c0:c1, :] = dv_t

    return _finalise_grads(dq, dk, dv, hk, squeeze)


# ---------------------------------------------------------------------------
# Variable length (packed sequences)
# ---------------------------------------------------------------------------


def _check_cu_seqlens(cu, total, name):
    """int array ``(batch + 1,)``: 0, non-decreasing, ending at ``total``."""
    cu = np.asarray(cu)
    if cu.ndim != 1 or cu.size < 1 or not np.issubdtype(cu.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array (batch + 1,), got "
                         f"{cu.dtype} {cu.shape}")
    if cu[0] != 0 or cu[-1] != total or np.any(np.diff(cu) < 0):
        raise ValueError(f"{name} must start at 0, never decrease and end at {total} "
                         f"(the packed length), got {cu.tolist()}")
    return cu.astype(np.int64)


def _varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes):
    """Per sequence ``b``: slices of rows, and q, k, v as ``(H, L, D)`` views, slopes."""
    if not (np.ndim(q) == np.ndim(k) == np.ndim(v) == 3):
        raise ValueError(f"varlen q, k, v must be (total, H, D), got shapes "
                         f"{np.shape(q)}, {np.shape(k)}, {np.shape(v)}")
    cu_q = _check_cu_seqlens(cu_seqlens_q, np.shape(q)[0], "cu_seqlens_q")
    cu_k = _check_cu_seqlens(cu_seqlens_k, np.shape(k)[0], "cu_seqlens_k")
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_q.size} and {cu_k.size}")
    slopes = None if alibi_slopes is None else np.broadcast_to(
        np.asarray(alibi_slopes, np.float64), (cu_q.size - 1, np.shape(q)[1]))
    for b in range(cu_q.size - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        views = (np.swapaxes(np.asarray(x)[rows], 0, 1) for x, rows in
                 ((q, rows_q), (k, rows_k), (v, rows_k)))
        yield rows_q, rows_k, *views, None if slopes is None else slopes[b]


def attention_varlen_naive(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None,
                           window=None, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                           dropout_mask=None):
    """Attention over packed sequences: :func:`attention_naive` on each.

    Sequence ``b`` is the rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and attends to
    the rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v; causal and window
    alignment are per sequence (bottom-right of each). ``alibi_slopes`` is ``(Hq,)`` or
    ``(batch, Hq)``.

    Parameters
    ----------
    q, k, v : array_like
        ``(total_q, Hq, D)``, ``(total_k, Hk, D)``, ``(total_k, Hk, Dv)``.
    cu_seqlens_q, cu_seqlens_k : array_like of int
        ``(batch + 1,)`` prefix sums of the sequence lengths.
    causal, scale, window, softcap, alibi_slopes
        As in :func:`attention_naive`.
    dropout_p, dropout_mask : float, array of bool ``(batch, Hq, max_lq, max_lk)``, optional
        Dropout: sequence ``b`` uses ``dropout_mask[b, :, :lq_b, :lk_b]``.

    Returns
    -------
    out : numpy.ndarray
        float64, ``(total_q, Hq, Dv)``.
    lse : numpy.ndarray
        float64, ``(Hq, total_q)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((7, 2, 4)) for _ in range(3))
    >>> out, lse = attention_varlen_naive(q, k, v, [0, 3, 3, 7], [0, 3, 3, 7], causal=True)
    >>> out.shape, lse.shape
    ((7, 2, 4), (2, 7))
    >>> one, _ = attention_naive(q[3:].swapaxes(0, 1), k[3:].swapaxes(0, 1),
    ...                          v[3:].swapaxes(0, 1), causal=True)
    >>> bool(np.allclose(out[3:], one.swapaxes(0, 1)))
    True
    """
    total_q, hq = np.shape(q)[:2]
    out = np.zeros((total_q, hq, np.shape(v)[-1]))
    lse = np.full((hq, total_q), -np.inf)
    for b, (rows_q, _, qb, kb, vb, slopes) in enumerate(
            _varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)):
        o, l = attention_naive(qb, kb, vb, causal=causal, scale=scale, window=window,
                               softcap=softcap, alibi_slopes=slopes,
                               **_sequence_dropout(dropout_p, dropout_mask, b, qb, kb))
        out[rows_q], lse[:, rows_q] = np.swapaxes(o, 0, 1), l
    return out, lse


def _sequence_dropout(dropout_p, dropout_mask, b, qb, kb) -> dict:
    """The dropout arguments of packed sequence ``b`` (q, k as ``(H, L, D)``)."""
    if dropout_mask is None:
        return {}
    return {"dropout_p": dropout_p,
            "dropout_mask": np.asarray(dropout_mask)[b, :, :qb.shape[1], :kb.shape[1]]}


def attention_varlen_backward_naive(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, *,
                                    causal=False, scale=None, window=None, softcap=0.0,
                                    alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """Gradients of :func:`attention_varlen_naive`: :func:`attention_backward_naive` on
    each sequence. ``dout`` is ``(total_q, Hq, Dv)``; returns float64 ``dq, dk, dv`` with
    the shapes of q, k and v."""
    dout = np.asarray(dout)
    if dout.shape != np.shape(q)[:2] + np.shape(v)[-1:]:
        raise ValueError(f"dout must have shape {np.shape(q)[:2] + np.shape(v)[-1:]}, "
                         f"got {dout.shape}")
    dq, dk, dv = (np.zeros(np.shape(x)) for x in (q, k, v))
    for b, (rows_q, rows_k, qb, kb, vb, slopes) in enumerate(
            _varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)):
        grads = attention_backward_naive(np.swapaxes(dout[rows_q], 0, 1), qb, kb, vb,
                                         causal=causal, scale=scale, window=window,
                                         softcap=softcap, alibi_slopes=slopes,
                                         **_sequence_dropout(dropout_p, dropout_mask, b, qb, kb))
        for g_all, rows, g in zip((dq, dk, dv), (rows_q, rows_k, rows_k), grads):
            g_all[rows] = np.swapaxes(g, 0, 1)
    return dq, dk, dv
