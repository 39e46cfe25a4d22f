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
