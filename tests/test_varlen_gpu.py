"""GPU correctness of cuflash.attention_varlen and its backward (marked ``gpu``).

Each packed sequence must give what cuflash.attention gives on that sequence alone, on
the same kernel family (portable or, on sm_90, Hopper): the same kernels visit the same
tiles in the same order, so the forward output, lse, and the deterministic gradients are
bit-identical. The default (atomic dQ) gradients are held to the tolerance rule against
the float64 reference, sequence by sequence. Outputs are poisoned (NaN) before each call.
"""

import math

import numpy as np
import pytest

import cuflash
from gpu_util import (DTYPES, GRADS, KERNEL_PATHS, check_grads, kernel_path, random_array,
                      random_qkv, to_f32)
from gpu_util import cp, poison_allocator  # noqa: F401

pytestmark = pytest.mark.gpu

LENGTHS = {  # (lengths_q, lengths_k)
    "mixed": ([10, 1000, 1, 0, 517], [10, 1000, 1, 3, 600]),  # 1000x apart, 0 and 1
    "cross": ([128, 77, 300], [1, 256, 129]),
    "one": ([1023], [1024]),
}
OPTIONS = {"plain": {}, "softcap+window": {"softcap": 2.0, "window": (64, 16)}}


def packed(cp, name, lengths_q, lengths_k, hq, hk, d, rng):
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)
    q, k, v = random_qkv(cp, (int(cu_q[-1]), hq, d), (int(cu_k[-1]), hk, d),
                         (int(cu_k[-1]), hk, d), name, rng)
    return q, k, v, cp.asarray(cu_q), cp.asarray(cu_k), cu_q, cu_k


def seq_view(x, rows):
    """(total, H, D) rows -> (1, H, L, D) view of that sequence."""
    return x[rows].swapaxes(0, 1)[None]


def bits(cp, x):
    return x.view(cp.uint16) if x.dtype != cp.float32 else x.view(cp.uint32)


@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("head_dim", (64, 128, 80))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_varlen_equals_each_sequence(cp, path, name, causal, head_dim, lengths, opt):
    rng = np.random.default_rng()
    lq, lk = LENGTHS[lengths]
    opts = OPTIONS[opt]
    q, k, v, cu_q, cu_k, hcu_q, hcu_k = packed(cp, name, lq, lk, 4, 2, head_dim, rng)
    with kernel_path(cp, path) as launched:
        out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                            causal=causal, return_lse=True, **opts)
        dout = random_array(cp, out.shape, name, rng)
        grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max(lq),
                                                  max(lk), causal=causal, **opts)
    if path == "sm90":  # head dims 64, 80, 128: both Hopper kernels take packed calls
        assert sorted({kind for kind, _ in launched}) == ["bwd", "fwd"]
    det = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max(lq),
                                            max(lk), causal=causal, deterministic=True, **opts)
    for x, label in ((out, "out"), (lse, "lse"), *zip(grads, GRADS), *zip(det, GRADS)):
        assert not bool(cp.isnan(x if x.dtype == cp.float32 else to_f32(cp, x)).any()), label
    for b in range(len(lq)):
        rq, rk = slice(int(hcu_q[b]), int(hcu_q[b + 1])), slice(int(hcu_k[b]), int(hcu_k[b + 1]))
        qs, ks, vs = seq_view(q, rq), seq_view(k, rk), seq_view(v, rk)
        with kernel_path(cp, path):
            o1, l1 = cuflash.attention(qs, ks, vs, causal=causal, return_lse=True, **opts)
        assert bool((bits(cp, seq_view(out, rq)) == bits(cp, o1)).all()), f"out of sequence {b}"
        assert bool((bits(cp, lse[:, rq][None]) == bits(cp, l1)).all()), f"lse of sequence {b}"
        d1 = cuflash.attention_backward(seq_view(dout, rq), qs, ks, vs, o1, l1, causal=causal,
                                        deterministic=True, **opts)
        for label, g, g1, rows in zip(GRADS, det, d1, (rq, rk, rk)):
            assert bool((bits(cp, seq_view(g, rows)) == bits(cp, g1)).all()), \
                f"deterministic {label} of sequence {b}"
        if rq.stop > rq.start or rk.stop > rk.start:
            # one key: P = 1 where it is seen, and dS is rounding noise around an exact 0, in
            # ours and in the plain reference alike; only dv is held to the rule there
            check_grads(cp, [seq_view(g, rows) for g, rows in zip(grads, (rq, rk, rk))], qs, ks,
                        vs, seq_view(dout, rq), o1, name, causal,
                        ruled=GRADS if rk.stop - rk.start > 1 else ("dv",), **opts)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_varlen_wide_backward(cp, causal):
    """Packed sequences on the sm_90a wide backward (head dim 256): each sequence's
    gradients against the float64 reference (lengths 0 and 1 among them)."""
    rng = np.random.default_rng()
    lq, lk = LENGTHS["mixed"]
    name = "bfloat16"
    q, k, v, cu_q, cu_k, hcu_q, hcu_k = packed(cp, name, lq, lk, 4, 2, 256, rng)
    with kernel_path(cp, "sm90") as launched:
        out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                            causal=causal, return_lse=True)
        dout = random_array(cp, out.shape, name, rng)
        grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                                  max(lq), max(lk), causal=causal)
    assert [s.wide for kind, s in launched if kind == "bwd"] == [True]
    for b in range(len(lq)):
        rq, rk = slice(int(hcu_q[b]), int(hcu_q[b + 1])), slice(int(hcu_k[b]), int(hcu_k[b + 1]))
        if rq.stop == rq.start and rk.stop == rk.start:
            continue
        qs, ks, vs = seq_view(q, rq), seq_view(k, rk), seq_view(v, rk)
        o1 = cuflash.attention(qs, ks, vs, causal=causal)
        check_grads(cp, [seq_view(g, rows) for g, rows in zip(grads, (rq, rk, rk))], qs, ks,
                    vs, seq_view(dout, rq), o1, name, causal,
                    ruled=GRADS if rk.stop - rk.start > 1 else ("dv",))


def test_varlen_many_sequences_and_alibi(cp):
    """300 sequences of 0..40 rows with per-(sequence, head) ALiBi slopes."""
    rng = np.random.default_rng()
    lq = list(rng.integers(0, 41, 300))
    lk = list(rng.integers(0, 41, 300))
    q, k, v, cu_q, cu_k, hcu_q, hcu_k = packed(cp, "bfloat16", lq, lk, 4, 4, 64, rng)
    slopes = cp.asarray(rng.uniform(0, 0.5, (300, 4)), dtype=cp.float32)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 40, 40, causal=True,
                                        return_lse=True, alibi_slopes=slopes)
    dout = random_array(cp, out.shape, "bfloat16", rng)
    det = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 40, 40,
                                            causal=True, deterministic=True,
                                            alibi_slopes=slopes)
    for b in range(0, 300, 7):
        rq, rk = slice(int(hcu_q[b]), int(hcu_q[b + 1])), slice(int(hcu_k[b]), int(hcu_k[b + 1]))
        qs, ks, vs = seq_view(q, rq), seq_view(k, rk), seq_view(v, rk)
        o1, l1 = cuflash.attention(qs, ks, vs, causal=True, return_lse=True,
                                   alibi_slopes=slopes[b])
        assert bool((bits(cp, seq_view(out, rq)) == bits(cp, o1)).all()), b
        d1 = cuflash.attention_backward(seq_view(dout, rq), qs, ks, vs, o1, l1, causal=True,
                                        deterministic=True, alibi_slopes=slopes[b])
        for g, g1, rows in zip(det, d1, (rq, rk, rk)):
            assert bool((bits(cp, seq_view(g, rows)) == bits(cp, g1)).all()), b


def test_varlen_deterministic_bitwise_and_outputs(cp):
    rng = np.random.default_rng()
    lq = lk = [700, 3, 250]
    q, k, v, cu_q, cu_k, _, _ = packed(cp, "float16", lq, lk, 8, 2, 128, rng)
    out = cp.empty(q.shape, q.dtype)
    o, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 700, 700, return_lse=True, out=out)
    assert o is out
    dout = random_array(cp, o.shape, "float16", rng)
    bufs = [cp.empty(x.shape, x.dtype) for x in (q, k, v)]
    first = cuflash.attention_varlen_backward(dout, q, k, v, o, lse, cu_q, cu_k, 700, 700,
                                              deterministic=True, dq=bufs[0], dk=bufs[1],
                                              dv=bufs[2])
    assert all(a is b for a, b in zip(first, bufs))
    first = [x.copy() for x in first]
    for _ in range(4):
        again = cuflash.attention_varlen_backward(dout, q, k, v, o, lse, cu_q, cu_k, 700, 700,
                                                  deterministic=True)
        for a, b in zip(again, first):
            assert bool((bits(cp, a) == bits(cp, b)).all())


def test_varlen_matches_numpy_path(cp):
    rng = np.random.default_rng()
    lq, lk = [5, 0, 33], [9, 2, 33]
    q, k, v, cu_q, cu_k, hcu_q, hcu_k = packed(cp, "float16", lq, lk, 2, 1, 40, rng)
    gpu = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 33, 33, causal=True, softcap=3.0)
    cpu = cuflash.attention_varlen(q.get(), k.get(), v.get(), hcu_q, hcu_k, 33, 33, causal=True,
                                   softcap=3.0)
    np.testing.assert_allclose(to_f32(cp, gpu).get(), cpu.astype(np.float32), atol=3e-3)
    assert math.isfinite(float(to_f32(cp, gpu).sum()))
