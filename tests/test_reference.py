"""Tests of the NumPy reference attention (cuflash._reference). CPU only."""

import itertools
import math
import warnings

import ml_dtypes
import numpy as np
import pytest

from cuflash import _reference as ref

TILED = {
    "fa2": ref.attention_tiled_fa2,
    "fa1": ref.attention_tiled_fa1,
}

LENGTHS = [(1, 1), (1, 17), (13, 29), (64, 64), (65, 130), (130, 65), (0, 5), (5, 0)]
DIMS = [(8, 8), (40, 40), (16, 24)]
BLOCKS = [(16, 32), (64, 16)]


@pytest.fixture(autouse=True)
def _strict_numpy():
    """Any NumPy RuntimeWarning / FP error (except harmless underflow) fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(divide="raise", invalid="raise", over="raise"):
            yield


def _rand(rng, *shape):
    return rng.standard_normal(shape)


def _qkv(seed, lead, hq, hk, lq, lk, d, dv):
    rng = np.random.default_rng(seed)
    q = _rand(rng, *lead, hq, lq, d)
    k = _rand(rng, *lead, hk, lk, d)
    v = _rand(rng, *lead, hk, lk, dv)
    return q, k, v


def _assert_same(got, want, atol=1e-12, rtol=1e-12):
    out_g, lse_g = got
    out_w, lse_w = want
    assert out_g.dtype == np.float64 and lse_g.dtype == np.float64
    assert out_g.shape == out_w.shape
    assert lse_g.shape == lse_w.shape
    assert not np.isnan(out_g).any() and not np.isnan(lse_g).any()
    np.testing.assert_allclose(out_g, out_w, atol=atol, rtol=rtol)
    # lse may hold -inf: positions must agree, finite values must be close
    np.testing.assert_array_equal(np.isneginf(lse_g), np.isneginf(lse_w))
    fin = np.isfinite(lse_w)
    np.testing.assert_allclose(lse_g[fin], lse_w[fin], atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------
# tiled == naive
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", sorted(TILED))
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"bm{b[0]}bn{b[1]}")
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"d{d[0]}dv{d[1]}")
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda l: f"lq{l[0]}lk{l[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiled_matches_naive(impl, blocks, dims, lengths, causal):
    lq, lk = lengths
    d, dv = dims
    bm, bn = blocks
    q, k, v = _qkv(1009 * lq + 31 * lk + 7 * d + dv, (2,), 3, 3, lq, lk, d, dv)
    want = ref.attention_naive(q, k, v, causal=causal)
    got = TILED[impl](q, k, v, causal=causal, block_m=bm, block_n=bn)
    assert want[0].shape == (2, 3, lq, dv)
    assert want[1].shape == (2, 3, lq)
    _assert_same(got, want)


@pytest.mark.parametrize("impl", sorted(TILED))
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(impl, causal):
    q, k, v = _qkv(1, (2,), 4, 2, 37, 53, 16, 24)
    got_naive = ref.attention_naive(q, k, v, causal=causal)
    # explicit per-head computation: query head h uses kv head h // 2
    for h in range(4):
        o_h, lse_h = ref.attention_naive(
            q[:, h], k[:, h // 2], v[:, h // 2], causal=causal
        )
        np.testing.assert_allclose(got_naive[0][:, h], o_h, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(got_naive[1][:, h], lse_h, rtol=1e-13, atol=1e-13)
    got = TILED[impl](q, k, v, causal=causal, block_m=16, block_n=32)
    assert got[0].shape == (2, 4, 37, 24) and got[1].shape == (2, 4, 37)
    _assert_same(got, got_naive)


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
@pytest.mark.parametrize("causal", [False, True])
def test_2d_inputs(impl, causal):
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(2, (), 1, 1, 21, 34, 8, 12)
    kw = {} if impl == "naive" else {"block_m": 16, "block_n": 16}
    out3, lse3 = ref.attention_naive(q, k, v, causal=causal)
    out2, lse2 = fn(q[0], k[0], v[0], causal=causal, **kw)
    assert out2.shape == (21, 12) and lse2.shape == (21,)
    _assert_same((out2, lse2), (out3[0], lse3[0]))


@pytest.mark.parametrize("impl", sorted(TILED))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(13, 29), (65, 130), (130, 65), (40, 40)])
def test_window_matches_naive(impl, causal, lengths):
    lq, lk = lengths
    q, k, v = _qkv(3, (2,), 2, 2, lq, lk, 16, 16)
    want = ref.attention_naive(q, k, v, causal=causal, window=(7, 3))
    got = TILED[impl](q, k, v, causal=causal, window=(7, 3), block_m=16, block_n=16)
    _assert_same(got, want)


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
@pytest.mark.parametrize("lengths", [(13, 29), (65, 130), (130, 65), (5, 2)])
def test_window_minus1_0_is_causal(impl, lengths):
    lq, lk = lengths
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(4, (1,), 2, 2, lq, lk, 8, 8)
    a = fn(q, k, v, window=(-1, 0))
    b = fn(q, k, v, causal=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(
        ref.visible_mask(lq, lk, window=(-1, 0)), ref.visible_mask(lq, lk, True)
    )


# ---------------------------------------------------------------------------
# mask rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (7, 3), (-1, 2), (0, -1), (3, 0)])
@pytest.mark.parametrize("lengths", [(5, 2), (2, 5), (9, 9), (0, 3), (3, 0)])
def test_visible_mask_rule(causal, window, lengths):
    lq, lk = lengths
    m = ref.visible_mask(lq, lk, causal, window=window)
    assert m.dtype == bool and m.shape == (lq, lk)
    left, right = (-1, -1) if window is None else window
    for i in range(lq):
        for j in range(lk):
            c = i + lk - lq
            want = True
            if causal and j > c:
                want = False
            if left != -1 and j < c - left:
                want = False
            if right != -1 and j > c + right:
                want = False
            assert m[i, j] == want, (i, j)


def test_key_range_covers_all_visible_keys():
    """The tile key range (used to skip tiles) never drops a visible key."""
    for lq, lk, causal, window, bm in itertools.product(
        [1, 7, 33, 64], [1, 9, 40, 64], [False, True],
        [None, (7, 3), (0, 0), (-1, 5), (4, -1)], [1, 16, 64],
    ):
        left, right = ref._resolve_window(causal, window)
        m = ref.visible_mask(lq, lk, causal, window=window)
        for r0 in range(0, lq, bm):
            r1 = min(r0 + bm, lq)
            lo, hi = ref._key_range(r0, r1, lq, lk, left, right)
            assert 0 <= lo <= hi <= lk
            assert not m[r0:r1, :lo].any()
            assert not m[r0:r1, hi:].any()


# ---------------------------------------------------------------------------
# naive vs independent computations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_naive_matches_python_loops(causal):
    rng = np.random.default_rng(5)
    lq, lk, d, dv = 3, 4, 2, 3
    q = rng.standard_normal((lq, d))
    k = rng.standard_normal((lk, d))
    v = rng.standard_normal((lk, dv))
    scale = 1.0 / math.sqrt(d)
    out_w = np.zeros((lq, dv))
    lse_w = np.zeros(lq)
    for i in range(lq):
        js = [j for j in range(lk) if not causal or j <= i + lk - lq]
        s = {j: scale * sum(q[i, t] * k[j, t] for t in range(d)) for j in js}
        mx = max(s.values())
        e = {j: math.exp(s[j] - mx) for j in js}
        tot = sum(e.values())
        lse_w[i] = mx + math.log(tot)
        for c in range(dv):
            out_w[i, c] = sum(e[j] / tot * v[j, c] for j in js)
    out, lse = ref.attention_naive(q, k, v, causal=causal)
    np.testing.assert_allclose(out, out_w, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse, lse_w, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
@pytest.mark.parametrize("causal", [False, True])
def test_lse_is_logsumexp(impl, causal):
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(6, (2,), 2, 2, 19, 45, 16, 8)
    q *= 3.0  # make the scores spread out
    _, lse = fn(q, k, v, causal=causal)
    s = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(16)
    mask = ref.visible_mask(19, 45, causal)
    want = np.empty((2, 2, 19))
    for i in range(19):
        row = s[..., i, mask[i]]
        want[..., i] = np.log(np.sum(np.exp(row), axis=-1))
    np.testing.assert_allclose(lse, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# empty rows, zero sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
def test_empty_rows_causal(impl):
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(7, (2,), 3, 3, 5, 2, 8, 8)
    kw = {} if impl == "naive" else {"block_m": 2, "block_n": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            out, lse = fn(q, k, v, causal=True, **kw)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    # rows 0..2 see no key (j <= i - 3)
    assert np.array_equal(out[..., :3, :], np.zeros((2, 3, 3, 8)))
    assert np.all(np.isneginf(lse[..., :3]))
    assert np.all(np.isfinite(lse[..., 3:]))
    # row 3 sees only key 0, row 4 sees keys 0, 1
    np.testing.assert_allclose(out[..., 3, :], v[..., 0, :], rtol=1e-14, atol=1e-14)
    _assert_same((out, lse), ref.attention_naive(q, k, v, causal=True))


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
def test_window_empty_rows(impl):
    """A window can leave rows empty in the middle of a visited tile."""
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(8, (1,), 2, 2, 10, 4, 8, 8)
    out, lse = fn(q, k, v, window=(0, 0))  # row i sees only key i - 6
    assert np.array_equal(out[..., :6, :], np.zeros((1, 2, 6, 8)))
    assert np.all(np.isneginf(lse[..., :6]))
    np.testing.assert_allclose(out[..., 6:, :], v, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
@pytest.mark.parametrize(
    "shape", [(0, 5), (5, 0), (0, 0)], ids=lambda s: f"lq{s[0]}lk{s[1]}"
)
def test_zero_size(impl, shape):
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    lq, lk = shape
    q, k, v = _qkv(9, (2,), 4, 2, lq, lk, 8, 6)
    for causal in (False, True):
        out, lse = fn(q, k, v, causal=causal)
        assert out.shape == (2, 4, lq, 6) and lse.shape == (2, 4, lq)
        assert out.dtype == np.float64 and lse.dtype == np.float64
        assert np.array_equal(out, np.zeros_like(out))
        assert np.all(np.isneginf(lse))
    # empty batch
    q, k, v = _qkv(9, (0,), 2, 2, 3, 4, 8, 6)
    out, lse = fn(q, k, v)
    assert out.shape == (0, 2, 3, 6) and lse.shape == (0, 2, 3)


# ---------------------------------------------------------------------------
# dtypes, scale, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, ml_dtypes.bfloat16], ids=lambda t: np.dtype(t).name
)
def test_low_precision_inputs(impl, dtype):
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(10, (2,), 2, 2, 33, 47, 16, 16)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    got = fn(q, k, v, causal=True)
    want = ref.attention_naive(
        *(x.astype(np.float64) for x in (q, k, v)), causal=True
    )
    _assert_same(got, want)


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
def test_default_scale(impl):
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(11, (2,), 2, 2, 17, 23, 40, 8)
    a = fn(q, k, v)
    b = fn(q, k, v, scale=1.0 / math.sqrt(40))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = fn(q, k, v, scale=0.5)
    d = ref.attention_naive(q * 0.5, k, v, scale=1.0)
    _assert_same(c, d)
    assert not np.allclose(a[1], c[1])


@pytest.mark.parametrize("impl", ["naive"] + sorted(TILED))
def test_shape_errors(impl):
    fn = ref.attention_naive if impl == "naive" else TILED[impl]
    q, k, v = _qkv(12, (2,), 3, 2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        fn(q, k, v)
    q, k, v = _qkv(12, (2,), 2, 2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="head dim"):
        fn(q, k[..., :4], v)
    with pytest.raises(ValueError, match="sequence length"):
        fn(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="leading"):
        fn(q, k[:1], v[:1])


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------

BWD_LENGTHS = [(1, 1), (1, 7), (13, 29), (29, 13), (64, 64), (37, 100)]
BWD_BLOCKS = [(1, 1), (7, 5), (16, 32), (64, 128)]
BWD_WINDOWS = [None, (7, 3), (0, 0)]


def _dout(seed, q, v):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(q.shape[:-1] + v.shape[-1:])


def _bwd(impl, dout, q, k, v, block_m=16, block_n=32, **kw):
    """Gradients by ``impl``; the tiled one gets out, lse from attention_naive."""
    if impl == "naive":
        return ref.attention_backward_naive(dout, q, k, v, **kw)
    out, lse = ref.attention_naive(q, k, v, **kw)
    return ref.attention_backward_tiled(
        dout, q, k, v, out, lse, block_m=block_m, block_n=block_n, **kw
    )


def _assert_grads(got, want, rtol=1e-10, atol=1e-12):
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g.dtype == np.float64
        assert g.shape == np.shape(w)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("blocks", BWD_BLOCKS, ids=lambda b: f"bm{b[0]}bn{b[1]}")
@pytest.mark.parametrize("dims", [(8, 8), (16, 24)], ids=lambda d: f"d{d[0]}dv{d[1]}")
@pytest.mark.parametrize("lengths", BWD_LENGTHS, ids=lambda l: f"lq{l[0]}lk{l[1]}")
@pytest.mark.parametrize("window", BWD_WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_tiled_matches_naive(blocks, dims, lengths, window, causal):
    lq, lk = lengths
    d, dv = dims
    bm, bn = blocks
    q, k, v = _qkv(1013 * lq + 37 * lk + 5 * d + dv, (2,), 3, 3, lq, lk, d, dv)
    dout = _dout(lq + lk, q, v)
    kw = dict(causal=causal, window=window)
    want = ref.attention_backward_naive(dout, q, k, v, **kw)
    assert [w.shape for w in want] == [q.shape, k.shape, v.shape]
    _assert_grads(_bwd("tiled", dout, q, k, v, bm, bn, **kw), want)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=str)
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (3, 3)], ids=lambda h: f"hq{h[0]}hk{h[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_gqa_and_leading_dims(lead, heads, causal):
    hq, hk = heads
    q, k, v = _qkv(21, lead, hq, hk, 19, 27, 8, 12)
    dout = _dout(22, q, v)
    got = ref.attention_backward_naive(dout, q, k, v, causal=causal)
    # explicit per-head computation: query head h uses kv head h // (hq // hk),
    # dk and dv collect the contributions of every query head of the group
    want = (np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape))
    for h in range(hq):
        g = h // (hq // hk)
        dq_h, dk_h, dv_h = ref.attention_backward_naive(
            dout[..., h, :, :], q[..., h, :, :], k[..., g, :, :], v[..., g, :, :],
            causal=causal,
        )
        want[0][..., h, :, :] = dq_h
        want[1][..., g, :, :] += dk_h
        want[2][..., g, :, :] += dv_h
    _assert_grads(got, want, rtol=1e-12, atol=1e-13)
    _assert_grads(_bwd("tiled", dout, q, k, v, 8, 5, causal=causal), got)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_2d_inputs(impl, causal):
    q, k, v = _qkv(23, (), 1, 1, 21, 34, 8, 12)
    dout = _dout(24, q, v)
    want = ref.attention_backward_naive(dout, q, k, v, causal=causal)
    got = _bwd(impl, dout[0], q[0], k[0], v[0], 8, 16, causal=causal)
    assert [g.shape for g in got] == [(21, 8), (34, 8), (34, 12)]
    _assert_grads(got, [w[0] for w in want], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(causal=True),
        dict(hk=1),
        dict(causal=True, hk=1, scale=0.7),
        dict(window=(2, 1)),
        dict(causal=True, window=(3, -1)),
        dict(causal=True, lq=9),  # rows 0, 1 see no key
        dict(softcap=0.8),  # tight: tanh well into its curve
        dict(causal=True, hk=1, softcap=2.0, alibi_slopes=(0.5, 0.25)),
        dict(window=(2, 1), alibi_slopes=((0.3, 0.9),)),  # per batch and head
    ],
    ids=lambda c: "-".join(f"{a}{b}" for a, b in c.items()) or "full",
)
def test_backward_finite_differences(impl, case):
    """Gradients of L = sum(dout * out) against central differences."""
    case = dict(case)
    hk, lq = case.pop("hk", 2), case.pop("lq", 5)
    q, k, v = _qkv(25, (1,), 2, hk, lq, 7, 3, 4)
    dout = _dout(26, q, v)

    def loss():
        return np.sum(dout * ref.attention_naive(q, k, v, **case)[0])

    eps = 1e-6
    want = []
    for x in (q, k, v):
        g = np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            x0 = x[idx]
            x[idx] = x0 + eps
            up = loss()
            x[idx] = x0 - eps
            down = loss()
            x[idx] = x0
            g[idx] = (up - down) / (2 * eps)
        want.append(g)
    got = _bwd(impl, dout, q, k, v, 2, 3, **case)
    _assert_grads(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize(
    "case",
    [
        (5, 2, dict(causal=True), 3),    # row i sees keys j <= i - 3
        (10, 4, dict(window=(0, 0)), 6),  # row i sees key i - 6 only
        (9, 9, dict(causal=True, window=(1, -1)), 0),  # a band, no empty row
    ],
    ids=["causal", "window", "band"],
)
def test_backward_empty_rows(impl, case):
    lq, lk, kw, n_empty = case
    q, k, v = _qkv(27, (2,), 4, 2, lq, lk, 8, 6)
    dout = _dout(28, q, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            dq, dk, dv = _bwd(impl, dout, q, k, v, 3, 2, **kw)
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))
    assert np.array_equal(dq[..., :n_empty, :], np.zeros((2, 4, n_empty, 8)))
    # empty rows contribute nothing: changing their q and dout changes nothing
    rng = np.random.default_rng(29)
    q2, dout2 = q.copy(), dout.copy()
    q2[..., :n_empty, :] = rng.standard_normal((2, 4, n_empty, 8))
    dout2[..., :n_empty, :] = rng.standard_normal((2, 4, n_empty, 6))
    dq2, dk2, dv2 = _bwd(impl, dout2, q2, k, v, 3, 2, **kw)
    np.testing.assert_array_equal(dq2, dq)
    np.testing.assert_allclose(dk2, dk, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dv2, dv, rtol=1e-14, atol=1e-15)
    _assert_grads((dq, dk, dv), ref.attention_backward_naive(dout, q, k, v, **kw))


def test_backward_tiled_uses_given_out_and_lse():
    """out only enters through delta, lse only through P = exp(S - lse)."""
    q, k, v = _qkv(30, (2,), 2, 2, 11, 17, 8, 8)
    dout = _dout(31, q, v)
    out, lse = ref.attention_naive(q, k, v, causal=True)
    grads = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal=True)
    # lse + log 2 halves P, hence dS and all three gradients
    half = ref.attention_backward_tiled(
        dout, q, k, v, out, lse + math.log(2.0), causal=True
    )
    _assert_grads(half, [g / 2 for g in grads], rtol=1e-13, atol=1e-15)
    # another out changes delta: dq and dk move, dv does not
    dq, dk, dv = ref.attention_backward_tiled(
        dout, q, k, v, np.zeros_like(out), lse, causal=True
    )
    np.testing.assert_array_equal(dv, grads[2])
    assert not np.allclose(dq, grads[0]) and not np.allclose(dk, grads[1])
    # a row with lse = -inf has P = 0 even where keys are visible
    lse_inf = lse.copy()
    lse_inf[..., 6] = -np.inf
    dq, dk, dv = ref.attention_backward_tiled(dout, q, k, v, out, lse_inf, causal=True)
    assert np.isfinite(dk).all() and np.isfinite(dv).all()
    assert np.array_equal(dq[..., 6, :], np.zeros((2, 2, 8)))


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize(
    "shape", [(0, 5), (5, 0), (0, 0)], ids=lambda s: f"lq{s[0]}lk{s[1]}"
)
def test_backward_zero_size(impl, shape):
    lq, lk = shape
    for lead in [(2,), (0,)]:
        q, k, v = _qkv(32, lead, 4, 2, lq, lk, 8, 6)
        dout = _dout(33, q, v)
        for causal in (False, True):
            got = _bwd(impl, dout, q, k, v, causal=causal)
            for g, x in zip(got, (q, k, v)):
                assert g.dtype == np.float64 and g.shape == x.shape
                assert np.array_equal(g, np.zeros_like(x))
    q, k, v = _qkv(34, (0,), 2, 2, 3, 4, 8, 6)  # empty batch only
    got = _bwd(impl, _dout(35, q, v), q, k, v)
    assert [g.shape for g in got] == [(0, 2, 3, 8), (0, 2, 4, 8), (0, 2, 4, 6)]


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, ml_dtypes.bfloat16], ids=lambda t: np.dtype(t).name
)
def test_backward_low_precision_inputs(impl, dtype):
    q, k, v = _qkv(36, (2,), 4, 2, 33, 47, 16, 16)
    dout = _dout(37, q, v)
    low = [x.astype(dtype) for x in (dout, q, k, v)]
    got = _bwd(impl, *low, causal=True)
    want = ref.attention_backward_naive(
        *(x.astype(np.float64) for x in low), causal=True
    )
    _assert_grads(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_backward_default_scale(impl):
    q, k, v = _qkv(38, (2,), 2, 2, 17, 23, 40, 8)
    dout = _dout(39, q, v)
    a = _bwd(impl, dout, q, k, v)
    b = _bwd(impl, dout, q, k, v, scale=1.0 / math.sqrt(40))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_backward_shape_errors(impl):
    q, k, v = _qkv(40, (2,), 2, 2, 4, 6, 8, 5)
    dout = _dout(41, q, v)
    with pytest.raises(ValueError, match="dout"):
        _bwd(impl, dout[..., :4], q, k, v)
    with pytest.raises(ValueError, match="dout"):
        _bwd(impl, dout[..., :3, :], q, k, v)
    with pytest.raises(ValueError, match="multiple"):
        _bwd(impl, dout, q, k[:, :1].repeat(3, axis=1), v[:, :1].repeat(3, axis=1))
    if impl == "tiled":
        out, lse = ref.attention_naive(q, k, v)
        with pytest.raises(ValueError, match="out"):
            ref.attention_backward_tiled(dout, q, k, v, out[..., :1], lse)
        with pytest.raises(ValueError, match="lse"):
            ref.attention_backward_tiled(dout, q, k, v, out, lse[..., None])
        with pytest.raises(ValueError, match="block"):
            ref.attention_backward_tiled(dout, q, k, v, out, lse, block_n=0)


def test_query_range_covers_all_visible_rows():
    """The query range of a key tile (used to skip tiles) never drops a row."""
    for lq, lk, causal, window, bn in itertools.product(
        [0, 1, 7, 33, 64], [1, 9, 40, 64], [False, True],
        [None, (7, 3), (0, 0), (-1, 5), (4, -1)], [1, 16, 64],
    ):
        left, right = ref._resolve_window(causal, window)
        m = ref.visible_mask(lq, lk, causal, window=window)
        for c0 in range(0, lk, bn):
            c1 = min(c0 + bn, lk)
            lo, hi = ref._query_range(c0, c1, lq, lk, left, right)
            assert 0 <= lo <= hi <= lq
            assert not m[:lo, c0:c1].any()
            assert not m[hi:, c0:c1].any()
            assert (lo < hi) == m[:, c0:c1].any()  # tiles skipped only if unseen


# ---------------------------------------------------------------------------
# softcap and ALiBi
# ---------------------------------------------------------------------------


def _modified_naive(q, k, v, causal, softcap, slopes):
    """The definition, written out: softcap, then -slope * |i + Lk - Lq - j|, masked
    softmax; q, k, v of shape (B, H, L, D), no GQA."""
    lq, lk = q.shape[-2], k.shape[-2]
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * np.tanh(s / softcap)
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    s = s - np.asarray(slopes)[..., None, None] * np.abs(i + lk - lq - j)
    s = np.where(ref.visible_mask(lq, lk, causal), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    return (p / p.sum(axis=-1, keepdims=True)) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_alibi_definition(causal):
    q, k, v = _qkv(40, (2,), 3, 3, 11, 19, 8, 5)
    q *= 4  # large scores, so the softcap matters
    slopes = np.array([[0.1, 0.5, 1.0], [0.0, 0.2, 0.3]])
    out, _ = ref.attention_naive(q, k, v, causal=causal, softcap=1.5, alibi_slopes=slopes)
    np.testing.assert_allclose(out, _modified_naive(q, k, v, causal, 1.5, slopes), rtol=1e-12,
                               atol=1e-12)
    plain, _ = ref.attention_naive(q, k, v, causal=causal)
    assert not np.allclose(out, plain)


@pytest.mark.parametrize("impl", sorted(TILED))
@pytest.mark.parametrize("lengths", [(13, 29), (65, 130), (130, 65)],
                         ids=lambda l: f"lq{l[0]}lk{l[1]}")
@pytest.mark.parametrize("case", [dict(softcap=1.0), dict(alibi_slopes=(0.25, 0.0625)),
                                  dict(causal=True, window=(20, -1), softcap=3.0,
                                       alibi_slopes=(0.5, 0.125))],
                         ids=["softcap", "alibi", "all"])
def test_softcap_alibi_tiled_matches_naive(impl, lengths, case):
    q, k, v = _qkv(41, (2,), 2, 1, *lengths, 16, 8)  # GQA 2:1, slopes per query head
    got = TILED[impl](q * 3, k, v, block_m=16, block_n=32, **case)
    _assert_same(got, ref.attention_naive(q * 3, k, v, **case))


@pytest.mark.parametrize("case", [dict(softcap=0.5), dict(causal=True, alibi_slopes=(1.0, 2.0)),
                                  dict(softcap=2.0, alibi_slopes=((0.1, 0.2), (0.3, 0.4)))],
                         ids=["softcap", "alibi", "both"])
def test_softcap_alibi_backward_tiled_matches_naive(case):
    q, k, v = _qkv(42, (2,), 2, 2, 37, 100, 8, 8)
    dout = _dout(43, q, v)
    _assert_grads(_bwd("tiled", dout, q * 3, k, v, **case),
                  _bwd("naive", dout, q * 3, k, v, **case))


def test_alibi_2d_inputs_and_errors():
    q, k, v = _qkv(44, (), 1, 1, 7, 9, 4, 4)
    out2, _ = ref.attention_naive(q[0], k[0], v[0], alibi_slopes=0.5)
    out3, _ = ref.attention_naive(q, k, v, alibi_slopes=[0.5])
    np.testing.assert_allclose(out2, out3[0], rtol=1e-14)
    with pytest.raises(ValueError, match="alibi_slopes"):
        ref.attention_naive(q, k, v, alibi_slopes=[0.5, 0.25])
    with pytest.raises(ValueError, match="softcap"):
        ref.attention_naive(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        ref.attention_backward_naive(q, q, k, v, softcap=float("inf"))


# ---------------------------------------------------------------------------
# variable length
# ---------------------------------------------------------------------------

VARLEN = {
    "mixed": ([0, 5, 5, 6, 40], [0, 7, 8, 9, 50]),  # lengths 0 and 1, Lq != Lk
    "100x": ([0, 2, 202], [0, 3, 303]),             # lengths that differ by 100x
}


@pytest.mark.parametrize("case", [dict(), dict(causal=True), dict(causal=True, softcap=2.0),
                                  dict(window=(3, 1), alibi_slopes=(0.5, 0.25, 0.125, 0.1))],
                         ids=["full", "causal", "causal-softcap", "window-alibi"])
@pytest.mark.parametrize("lens", sorted(VARLEN))
def test_varlen_matches_each_sequence(lens, case):
    cu_q, cu_k = VARLEN[lens]
    rng = np.random.default_rng(50)
    q = rng.standard_normal((cu_q[-1], 4, 8))
    k, v = rng.standard_normal((cu_k[-1], 2, 8)), rng.standard_normal((cu_k[-1], 2, 6))
    dout = rng.standard_normal((cu_q[-1], 4, 6))
    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, **case)
    grads = ref.attention_varlen_backward_naive(dout, q, k, v, cu_q, cu_k, **case)
    assert out.shape == (cu_q[-1], 4, 6) and lse.shape == (4, cu_q[-1])
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for b in range(len(cu_q) - 1):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb, dob = (np.swapaxes(x, 0, 1) for x in (q[rq], k[rk], v[rk], dout[rq]))
        o, l = ref.attention_naive(qb, kb, vb, **case)
        np.testing.assert_allclose(out[rq], np.swapaxes(o, 0, 1), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.isneginf(lse[:, rq]), np.isneginf(l))
        want = ref.attention_backward_naive(dob, qb, kb, vb, **case)
        for g, w, rows in zip(grads, want, (rq, rk, rk)):
            np.testing.assert_allclose(g[rows], np.swapaxes(w, 0, 1), rtol=1e-12, atol=1e-12)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)


def test_varlen_per_batch_alibi_and_errors():
    cu = [0, 3, 9]
    rng = np.random.default_rng(51)
    q, k, v = (rng.standard_normal((9, 2, 4)) for _ in range(3))
    slopes = np.array([[0.5, 1.0], [0.0, 2.0]])
    out, _ = ref.attention_varlen_naive(q, k, v, cu, cu, alibi_slopes=slopes)
    o1, _ = ref.attention_naive(*(np.swapaxes(x[3:], 0, 1) for x in (q, k, v)),
                                alibi_slopes=slopes[1])
    np.testing.assert_allclose(out[3:], np.swapaxes(o1, 0, 1), rtol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ref.attention_varlen_naive(q, k, v, [0, 3, 8], cu)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ref.attention_varlen_naive(q, k, v, cu, [0, 5, 3, 9])
    with pytest.raises(ValueError, match="same length"):
        ref.attention_varlen_naive(q, k, v, cu, [0, 9])
    with pytest.raises(ValueError, match="total, H, D"):
        ref.attention_varlen_naive(q[None], k, v, cu, cu)
