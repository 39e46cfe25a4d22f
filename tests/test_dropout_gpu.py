"""GPU tests of dropout's mask (marked ``gpu``): the kernels' mask equals the NumPy
definition (cuflash/_dropout.py) in both of their layouts, keeps 1 - p of the scores, and
depends only on (seed, batch, head, i, j). The attention results with dropout are checked
against the float64 reference given that mask in tests/test_options_gpu.py (the "dropout"
option sets); here: same seed, same bits; packed sequences; the batch counter of views
that are walked in pieces.
"""

import math

import numpy as np
import pytest

import cuflash
from cuflash import _dropout
from gpu_util import (GRADS, KERNEL_PATHS, check_grads, kernel_path, max_err, random_array,
                      random_qkv, reference, to_f32)
from gpu_util import cp, poison_allocator  # noqa: F401
from test_options_gpu import check_forward, ref_options

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("transposed", (False, True), ids=("rows", "transposed"))
@pytest.mark.parametrize("shape", ((1, 1, 1, 1), (2, 3, 113, 203), (1, 2, 1023, 1024),
                                   (3, 1, 239, 17)), ids=str)
@pytest.mark.parametrize("p", (0.1, 0.5, 0.93))
def test_mask_equals_the_numpy_definition(cp, shape, p, transposed):
    B, H, Lq, Lk = shape
    seed = int(np.random.default_rng().integers(0, 2**64, dtype=np.uint64))
    q, k = cp.empty((B, H, Lq, 8), cp.float16), cp.empty((B, H, Lk, 8), cp.float16)
    got = cuflash.dropout_mask(q, k, dropout_p=p, seed=seed, transposed=transposed)
    want = _dropout.keep_mask(seed, p, B, H, Lq, Lk)
    assert got.dtype == cp.bool_ and got.shape == want.shape
    assert bool((got.get() == want).all())


def test_mask_of_a_numpy_call_and_p_zero(cp):
    q = np.zeros((2, 2, 50, 4), np.float16)
    m = cuflash.dropout_mask(q, q, dropout_p=0.3, seed=11)
    assert (m == _dropout.keep_mask(11, 0.3, 2, 2, 50, 50)).all()
    qg = cp.asarray(q)
    assert bool(cuflash.dropout_mask(qg, qg, dropout_p=0.0, seed=11).all())


@pytest.mark.parametrize("p", (0.05, 0.3, 0.5, 0.9))
def test_keep_rate_is_one_minus_p(cp, p):
    """Over 2^25 scores the keep rate is within 5 standard errors of 1 - p, and so is each
    of the 256 positions of a 16 x 16 block (where one Philox call's words are spread)."""
    B, H, L = 4, 8, 1024
    q = cp.empty((B, H, L, 8), cp.float16)
    seed = int(np.random.default_rng().integers(2**62))
    m = cuflash.dropout_mask(q, q, dropout_p=p, seed=seed)
    n = m.size
    rate = float(m.mean())
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma + 2**-17, (rate, 1 - p, sigma)
    per_slot = m.reshape(B * H, L // 16, 16, L // 16, 16).mean(axis=(0, 1, 3)).get()
    sigma_slot = math.sqrt(p * (1 - p) / (n / 256))
    assert np.abs(per_slot - (1 - p)).max() < 5 * sigma_slot + 2**-17


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_seed_gives_the_same_bits_and_another_seed_does_not(cp, path):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 4, 300, 64), (2, 2, 400, 64), (2, 2, 400, 64), "bfloat16", rng)
    kw = {"dropout_p": 0.25, "seed": 42, "causal": True}
    with kernel_path(cp, path) as launched:  # one kernel family throughout (bit for bit)
        o1, lse1 = cuflash.attention(q, k, v, return_lse=True, **kw)
        o2, lse2 = cuflash.attention(q, k, v, return_lse=True, **kw)
        assert bool((o1.view(cp.uint16) == o2.view(cp.uint16)).all())
        o3 = cuflash.attention(q, k, v, **{**kw, "seed": 43})
        assert not bool((o1.view(cp.uint16) == o3.view(cp.uint16)).all())
        o0, lse0 = cuflash.attention(q, k, v, causal=True, return_lse=True)
        assert bool((lse0 == lse1).all()), "lse is that of P, before dropout"
        dout = random_array(cp, o1.shape, "bfloat16", rng)
        grads = [cuflash.attention_backward(dout, q, k, v, o1, lse1, deterministic=det, **kw)
                 for det in (False, False, True, True)]
    assert bool(launched) == (path == "sm90")
    for det, g1, g2 in ((False, *grads[:2]), (True, *grads[2:])):
        if det:
            for a, b in zip(g1, g2):
                assert bool((a.view(cp.uint16) == b.view(cp.uint16)).all())
        check_grads(cp, g1, q, k, v, dout, o1, "bfloat16", True,
                    **ref_options(cp, {"dropout_p": 0.25, "seed": 42}, q.shape, k.shape[-2]))


@pytest.mark.parametrize("name", ("float16", "bfloat16"))
def test_dropout_batch_counter_of_views_walked_in_pieces(cp, name):
    """Leading dims (2, 3) whose strides do not merge: the calls run per outer index, and
    batch element (b0, b1) must still use the counter of flat index 3 b0 + b1."""
    rng = np.random.default_rng()
    full = [random_array(cp, (2, 6, 2, L, 64), name, rng) for L in (97, 130, 130)]
    q, k, v = (x[:, :3] for x in full)
    opts = {"dropout_p": 0.3, "seed": 99}
    o, lse = check_forward(cp, q, k, v, name, False, opts)
    dout = random_array(cp, o.shape, name, rng)
    grads = cuflash.attention_backward(dout, q, k, v, o, lse, **opts)
    check_grads(cp, grads, q, k, v, dout, o, name, False,
                **ref_options(cp, opts, q.shape, k.shape[-2]))


@pytest.mark.parametrize("head_dim", (96, 200))
@pytest.mark.parametrize("deterministic", (False, True))
def test_dropout_varlen_equals_the_masked_reference(cp, deterministic, head_dim):
    """Packed sequences (lengths 0, 1, 300 and 3 with 100x spread) with causal, softcap and
    dropout: sequence b uses the corner mask[b, :, :lq_b, :lk_b]. (On sm_90, head dim 200
    runs the wide backward kernel.)"""
    rng = np.random.default_rng()
    lens_q, lens_k = [0, 1, 300, 3], [5, 1, 310, 300]
    cu_q = cp.asarray(np.cumsum([0] + lens_q), cp.int32)
    cu_k = cp.asarray(np.cumsum([0] + lens_k), cp.int32)
    Hq, Hk, D = 4, 2, head_dim
    q, k, v = random_qkv(cp, (sum(lens_q), Hq, D), (sum(lens_k), Hk, D), (sum(lens_k), Hk, D),
                         "float16", rng)
    opts = {"dropout_p": 0.2, "seed": 7, "softcap": 5.0}
    o, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                      causal=True, return_lse=True, **opts)
    dout = random_array(cp, o.shape, "float16", rng)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, o, lse, cu_q, cu_k, max(lens_q),
                                              max(lens_k), causal=True,
                                              deterministic=deterministic, **opts)
    starts_q, starts_k = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq == 0:
            continue
        rq = slice(starts_q[b], starts_q[b] + lq)
        rk = slice(starts_k[b], starts_k[b] + lk)
        qb, kb, vb, ob, db = (x[r].swapaxes(0, 1)[None] for x, r in
                              ((q, rq), (k, rk), (v, rk), (o, rq), (dout, rq)))
        mask = _dropout.keep_mask(7, 0.2, len(lens_q), Hq, max(lens_q), max(lens_k))
        ropts = {"softcap": 5.0, "dropout_p": 0.2, "dropout_mask": mask[b:b + 1, :, :lq, :lk]}
        scale = 1 / math.sqrt(D)
        q32, k32, v32 = (to_f32(cp, x) for x in (qb, kb, vb))
        ref_o, _ = reference(cp, q32, k32, v32, True, scale, **ropts)
        pl_o, _ = reference(cp, q32, k32, v32, True, scale, plain_dtype="float16", **ropts)
        err, tol = max_err(cp, to_f32(cp, ob), ref_o), 2 * max_err(cp, pl_o, ref_o) + 1e-5
        assert err <= tol, (b, err, tol)
        gb = [g[r].swapaxes(0, 1)[None] for g, r in zip(grads, (rq, rk, rk))]
        # a one-key sequence has P = 1: its dS is rounding noise around an exact 0, in ours
        # and in the plain reference alike, so only dv is held to the rule there
        check_grads(cp, gb, qb, kb, vb, db, ob, "float16", True,
                    ruled=GRADS if lk > 1 else ("dv",), **ropts)


def test_dropout_grads_equal_between_atomic_and_deterministic(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 4, 700, 128), (1, 4, 900, 128), (1, 4, 900, 128), "float16",
                         rng)
    opts = {"dropout_p": 0.1, "seed": 3, "window": (300, 0)}
    o, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    dout = random_array(cp, o.shape, "float16", rng)
    a = cuflash.attention_backward(dout, q, k, v, o, lse, **opts)
    b = cuflash.attention_backward(dout, q, k, v, o, lse, deterministic=True, **opts)
    for label, x, y in zip(GRADS, a, b):
        x32, y32 = to_f32(cp, x), to_f32(cp, y)
        scale = float(cp.abs(y32).max())
        assert float(cp.abs(x32 - y32).max()) <= 2e-2 * scale, label
