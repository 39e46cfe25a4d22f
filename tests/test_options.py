"""CPU tests of the options (window, softcap, ALiBi): argument checks, the NumPy path
against the naive float64 reference, and the kernel arguments they turn into."""

import math

import numpy as np
import pytest

import cuflash
from cuflash import _dispatch, _options, _reference

BF16 = np.dtype(cuflash._api._BFLOAT16)


def _qkv(shape_q, shape_k, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (shape_q, shape_k, shape_k))


def _slopes(h, lead=()):
    return (2.0 ** -np.arange(1, h + 1, dtype=np.float32) * np.ones(lead + (1,), np.float32))


@pytest.mark.parametrize("window, err, match", [
    ((1,), ValueError, "window must be a"),
    ("ab", ValueError, "window must be a"),
    ((1.5, 0), TypeError, "window left must be an int"),
    ((1, True), TypeError, "window right must be an int"),
    ((-2, 0), ValueError, "window left must be >= 0"),
    ((0, -5), ValueError, "window right must be >= 0"),
])
def test_window_is_checked(window, err, match):
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(err, match=match):
        cuflash.attention(q, k, v, window=window)


@pytest.mark.parametrize("softcap, err", [
    (-1.0, ValueError), (math.inf, ValueError), (math.nan, ValueError), ("3", TypeError),
    (True, TypeError)])
def test_softcap_is_checked(softcap, err):
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(err, match="softcap"):
        cuflash.attention(q, k, v, softcap=softcap)


@pytest.mark.parametrize("slopes, err, match", [
    (np.ones(4, np.float64), TypeError, "alibi_slopes.dtype must be float32"),
    ([0.5] * 4, TypeError, "alibi_slopes must be a numpy.ndarray"),
    (np.ones(3, np.float32), ValueError, "alibi_slopes must have shape"),
    (np.ones((3, 4), np.float32), ValueError, "does not broadcast"),
    (np.ones((1, 2, 4), np.float32), ValueError, "alibi_slopes must have shape"),
    (np.array(1, np.float32), ValueError, "alibi_slopes must have shape"),
    (np.float32(1), TypeError, "alibi_slopes must be a numpy.ndarray"),
])
def test_alibi_slopes_are_checked(slopes, err, match):
    q, k, v = _qkv((2, 4, 5, 8), (2, 2, 6, 8))
    with pytest.raises(err, match=match):
        cuflash.attention(q, k, v, alibi_slopes=slopes)


CASES = [  # (shape_q, shape_k, causal, options)
    ((1, 2, 37, 16), (1, 2, 53, 16), False, {"window": (5, 3)}),
    ((1, 2, 53, 16), (1, 2, 37, 16), True, {"window": (7, -1)}),
    ((2, 4, 29, 24), (2, 2, 41, 24), True, {"window": (-1, -1), "softcap": 2.5}),
    ((2, 4, 29, 24), (2, 1, 41, 24), False, {"alibi_slopes": _slopes(4)}),
    ((2, 4, 29, 24), (2, 2, 41, 24), True,
     {"window": (9, 2), "softcap": 1.5, "alibi_slopes": _slopes(4, (2,))}),
    ((40, 16), (30, 16), False, {"window": (0, 0), "alibi_slopes": _slopes(1)}),
]


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_numpy_path_matches_naive(case):
    shape_q, shape_k, causal, opts = case
    q, k, v = _qkv(shape_q, shape_k, np.float32)
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    o, lse = cuflash.attention(q16, k16, v16, causal=causal, return_lse=True, **opts)
    ref_o, ref_lse = _reference.attention_naive(q16, k16, v16, causal=causal, **opts)
    np.testing.assert_allclose(o.astype(np.float64), ref_o, atol=2e-3)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    dout = np.random.default_rng(1).standard_normal(o.shape).astype(np.float16)
    grads = cuflash.attention_backward(dout, q16, k16, v16, o, lse, causal=causal, **opts)
    ref = _reference.attention_backward_naive(dout, q16, k16, v16, causal=causal, **opts)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g.astype(np.float64), r, atol=5e-3, rtol=5e-3)


def test_window_rows_that_see_nothing_are_zero():
    # Lq > Lk with window (0, 0): the first Lq - Lk rows see no key
    q, k, v = _qkv((1, 1, 9, 8), (1, 1, 4, 8))
    o, lse = cuflash.attention(q, k, v, window=(0, 0), return_lse=True)
    assert np.all(o[0, 0, :5] == 0) and np.all(np.isneginf(lse[0, 0, :5]))
    assert np.all(np.isfinite(lse[0, 0, 5:]))


@pytest.mark.parametrize("causal, window, expect", [
    (False, None, (-1, -1)), (True, None, (-1, 0)), (True, (4, 2), (4, 0)),
    (True, (4, -1), (4, 0)), (False, (-1, 0), (-1, 0)), (False, (3, 7), (3, 7))])
def test_causal_folds_into_the_window(causal, window, expect):
    q = np.zeros((1, 2, 3, 8), np.float16)
    opts = _options.parse(np, q, causal, {} if window is None else {"window": window})
    assert opts.window == expect


def test_kernel_choice():
    q = np.zeros((1, 2, 3, 8), np.float16)
    parse = lambda causal, **o: _options.parse(np, q, causal, o)  # noqa: E731
    assert _dispatch._kernel_mask(False, parse(False)) == (False, False, False)
    assert _dispatch._kernel_mask(True, parse(True)) == (True, False, False)
    assert _dispatch._kernel_mask(False, parse(False, window=(-1, 0))) == (True, False, False)
    assert _dispatch._kernel_mask(True, parse(True, softcap=3.0)) == (True, True, False)
    assert _dispatch._kernel_mask(True, parse(True, window=(8, 0))) == (False, True, False)
    assert _dispatch._kernel_mask(False, parse(False, window=(-1, 2))) == (False, True, False)
    assert _dispatch._kernel_mask(True, parse(True, dropout_p=0.1, seed=1)) == (True, True, True)
    assert _dispatch._kernel_mask(True, parse(True, dropout_p=0.0, seed=1)) == (True, False, False)


@pytest.mark.parametrize("lq, lk", [(1, 1), (7, 3), (3, 7), (64, 64)])
def test_clamped_window_hides_the_same_keys(lq, lk):
    """window_args clamps unbounded and oversized sides; the mask is unchanged."""
    for window in [(-1, -1), (-1, 0), (2, -1), (100, 100), (0, 0), (-1, 5)]:
        left, right = _options.Options(window).window_args(lq, lk)
        i = np.arange(lq)[:, None]
        j = np.arange(lk)[None, :]
        clamped = (j >= i + lk - lq - left) & (j <= i + lk - lq + right)
        np.testing.assert_array_equal(clamped, _reference.visible_mask(lq, lk, window=window))


def test_softcap_args():
    assert _options.Options().softcap_args(0.5) == (0.0, 0.0)
    a, b = _options.Options(softcap=20.0).softcap_args(0.125)
    assert a == 0.125 / 20 and math.isclose(b, 20 * math.log2(math.e))
