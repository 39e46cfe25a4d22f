"""The public API on NumPy inputs (CPU): results, shapes, and argument checking."""

import math

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import _reference

BF16 = np.dtype(ml_dtypes.bfloat16)


def _qkv(shape_q, shape_k, shape_v=None, dtype=np.float16, seed=None):
    rng = np.random.default_rng(seed)
    shape_v = shape_v or shape_k
    return tuple(rng.standard_normal(s).astype(dtype) for s in (shape_q, shape_k, shape_v))


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_numpy_path_matches_naive(dtype, causal):
    q, k, v = _qkv((2, 3, 37, 40), (2, 3, 53, 40), dtype=dtype)
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = _reference.attention_naive(q, k, v, causal=causal)
    assert out.dtype == q.dtype and out.shape == (2, 3, 37, 40)
    assert lse.dtype == np.float32 and lse.shape == (2, 3, 37)
    tol = 1e-2 if dtype == BF16 else 2e-3
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_returns_out_only_by_default():
    q, k, v = _qkv((4, 8), (6, 8))
    out = cuflash.attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.shape == (4, 8)


def test_out_argument_strided_view():
    q, k, v = _qkv((1, 2, 5, 16), (1, 2, 7, 16))
    buf = np.full((1, 5, 2, 16), np.nan, dtype=np.float16)
    view = buf.transpose(0, 2, 1, 3)
    res = cuflash.attention(q, k, v, out=view)
    assert res is view
    assert not np.isnan(buf).any()


def test_scale_and_gqa_and_dv():
    q, k, v = _qkv((2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 24))
    out, lse = cuflash.attention(q, k, v, scale=0.3, return_lse=True)
    ref, ref_lse = _reference.attention_naive(q, k, v, scale=0.3)
    assert out.shape == (2, 4, 9, 24)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


def test_empty_rows_are_zero_with_minus_inf_lse():
    q, k, v = _qkv((1, 1, 6, 8), (1, 1, 2, 8))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert (out[0, 0, :4] == 0).all() and np.isneginf(lse[0, 0, :4]).all()
    assert not np.isnan(out).any()


def test_zero_sizes():
    q, k, v = _qkv((1, 2, 0, 8), (1, 2, 3, 8))
    assert cuflash.attention(q, k, v).shape == (1, 2, 0, 8)
    q, k, v = _qkv((1, 2, 3, 8), (1, 2, 0, 8))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


# ----------------------------------------------------------------------------- errors


def test_mixed_array_types_raise_typeerror():
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(TypeError, match="v must be a numpy.ndarray or cupy.ndarray"):
        cuflash.attention(q, k, v.tolist())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_unsupported_dtype(dtype):
    q, k, v = _qkv((4, 8), (6, 8), dtype=dtype)
    with pytest.raises(TypeError, match="q.dtype must be float16 or bfloat16"):
        cuflash.attention(q, k, v)


def test_dtype_mismatch():
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(TypeError, match="share one dtype"):
        cuflash.attention(q, k.astype(BF16), v)


@pytest.mark.parametrize("shapes, match", [
    (((4,), (6, 8), (6, 8)), "q must have at least 2 dimensions"),
    (((4, 8), (6, 9), (6, 8)), "q and k head_dim differ"),
    (((4, 8), (6, 8), (5, 8)), "k and v sequence lengths differ"),
    (((2, 4, 8), (6, 8), (6, 8)), "same number of dimensions"),
    (((3, 4, 8), (2, 6, 8), (2, 6, 8)), "multiple of k/v heads"),
    (((2, 1, 4, 8), (3, 1, 6, 8), (3, 1, 6, 8)), "leading \\(batch\\) dims differ"),
    (((4, 300), (6, 300), (6, 300)), "between 1 and 256"),
    (((4, 0), (6, 0), (6, 0)), "between 1 and 256"),
    (((4, 8), (6, 8), (6, 257)), "v head_dim must be between 1 and 256"),
])
def test_bad_shapes(shapes, match):
    q, k, v = _qkv(*shapes)
    with pytest.raises(ValueError, match=match):
        cuflash.attention(q, k, v)


def test_non_contiguous_last_dim_rejected():
    q, k, v = _qkv((4, 8), (6, 16))
    with pytest.raises(ValueError, match="k must have a contiguous last dimension"):
        cuflash.attention(q, k[:, ::2], v[:, ::2])


@pytest.mark.parametrize("scale, exc", [("0.1", TypeError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (True, TypeError)])
def test_bad_scale(scale, exc):
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(exc, match="scale"):
        cuflash.attention(q, k, v, scale=scale)


def test_bad_flags():
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(TypeError, match="causal must be a bool"):
        cuflash.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        cuflash.attention(q, k, v, return_lse=1)


def test_bad_out():
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(ValueError, match="out must have shape"):
        cuflash.attention(q, k, v, out=np.empty((4, 9), np.float16))
    with pytest.raises(TypeError, match="out.dtype must be"):
        cuflash.attention(q, k, v, out=np.empty((4, 8), np.float32))


def test_unknown_option_is_named():
    q, k, v = _qkv((4, 8), (6, 8))
    with pytest.raises(NotImplementedError, match="softcap"):
        cuflash.attention(q, k, v, softcap=30.0)


def test_default_scale_is_inverse_sqrt_d():
    q, k, v = _qkv((1, 5, 24), (1, 7, 24))
    a = cuflash.attention(q, k, v)
    b = cuflash.attention(q, k, v, scale=1 / math.sqrt(24))
    np.testing.assert_array_equal(a, b)
