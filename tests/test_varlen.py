"""CPU tests of cuflash.attention_varlen and its backward: argument checks, and the NumPy
path against attention on each sequence alone."""

import numpy as np
import pytest

import cuflash


def _packed(lengths_q, lengths_k, hq=2, hk=1, d=16, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], hq, d)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], hk, d)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], hk, d)).astype(dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("opts", ({}, {"window": (3, 1), "softcap": 2.0}), ids=("plain", "opts"))
def test_matches_each_sequence_alone(causal, opts):
    lq, lk = [5, 0, 1, 12, 3], [7, 4, 1, 12, 0]
    q, k, v, cu_q, cu_k = _packed(lq, lk)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                        return_lse=True, **opts)
    assert out.shape == (q.shape[0], 2, 16) and lse.shape == (2, q.shape[0])
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(np.float16)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max(lq),
                                              max(lk), causal=causal, **opts)
    for b in range(len(lq)):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        t = lambda x: np.ascontiguousarray(x.swapaxes(0, 1))  # noqa: E731
        o1, l1 = cuflash.attention(t(q[rq]), t(k[rk]), t(v[rk]), causal=causal,
                                   return_lse=True, **opts)
        np.testing.assert_allclose(out[rq].astype(np.float32), t(o1).astype(np.float32),
                                   atol=2e-3)
        np.testing.assert_allclose(lse[:, rq], l1, atol=1e-5)
        g1 = cuflash.attention_backward(t(dout[rq]), t(q[rq]), t(k[rk]), t(v[rk]), o1, l1,
                                        causal=causal, **opts)
        for g, r, rows in zip(grads, g1, (rq, rk, rk)):
            np.testing.assert_allclose(g[rows].astype(np.float32), t(r).astype(np.float32),
                                       atol=3e-3)


def test_alibi_per_sequence():
    q, k, v, cu_q, cu_k = _packed([4, 6], [5, 6], hq=2, hk=2)
    slopes = np.array([[0.5, 0.25], [1.0, 0.0]], np.float32)
    out = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 6, 6, alibi_slopes=slopes)
    t = lambda x: np.ascontiguousarray(x.swapaxes(0, 1))  # noqa: E731
    one = cuflash.attention(t(q[4:]), t(k[5:]), t(v[5:]), alibi_slopes=slopes[1])
    np.testing.assert_allclose(out[4:].astype(np.float32), t(one).astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("change, err, match", [
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].astype(np.int64)), TypeError, "int32"),
    (lambda a: a.update(cu_seqlens_q=np.array([0, 5, 3, 10], np.int32)), ValueError, "falling"),
    (lambda a: a.update(cu_seqlens_q=np.array([1, 3, 3, 10], np.int32)), ValueError, "rise from 0"),
    (lambda a: a.update(cu_seqlens_k=np.array([0, 3, 10], np.int32)), ValueError, "one shape"),
    (lambda a: a.update(cu_seqlens_q=[0, 3, 3, 10]), TypeError, "numpy.ndarray"),
    (lambda a: a.update(max_seqlen_q=6), ValueError, "below the longest"),
    (lambda a: a.update(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be an int"),
    (lambda a: a.update(q=a["q"][None]), ValueError, "total, heads, head_dim"),
    (lambda a: a.update(q=a["q"][:, :1]), ValueError, "multiple of k/v heads"),
])
def test_arguments_are_checked(change, err, match):
    q, k, v, cu_q, cu_k = _packed([3, 0, 7], [3, 0, 7], hq=2, hk=2)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7,
                max_seqlen_k=7)
    if "multiple" in match:
        args["k"], args["v"] = k.repeat(2, axis=1), v.repeat(2, axis=1)
    change(args)
    with pytest.raises(err, match=match):
        cuflash.attention_varlen(**args)


def test_empty_batch_and_lengths():
    q, k, v, cu_q, cu_k = _packed([], [])
    out = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 0, 0)
    assert out.shape == (0, 2, 16)
    q, k, v, cu_q, cu_k = _packed([0, 4], [3, 0])
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 4, 3, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))  # sequence 1 sees no key
