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


@pytest.mark.parametrize("dtype", [np.float64, np.int16])
def test_unsupported_dtype(dtype):
    q, k, v = _qkv((4, 8), (6, 8), dtype=dtype)
    with pytest.raises(TypeError, match="q.dtype must be float16, bfloat16 or float32"):
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
    with pytest.raises(ValueError, match="seed is required"):
        cuflash.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match="alibi"):
        cuflash.attention(q, k, v, alibi=None)


def test_default_scale_is_inverse_sqrt_d():
    q, k, v = _qkv((1, 5, 24), (1, 7, 24))
    a = cuflash.attention(q, k, v)
    b = cuflash.attention(q, k, v, scale=1 / math.sqrt(24))
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- backward


def _fwd_bwd_inputs(shape_q, shape_k, shape_v=None, dtype=np.float16, causal=False,
                    scale=None, seed=0):
    """q, k, v, then out and lse from the NumPy forward, and a random dout."""
    q, k, v = _qkv(shape_q, shape_k, shape_v, dtype=dtype, seed=seed)
    out, lse = cuflash.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
    return dout, q, k, v, out, lse


def _grad_tol(dtype):
    return 3e-2 if dtype == BF16 else 4e-3


def _assert_grad_close(got, want, dtype, name=""):
    """Within fp16/bf16 tolerance, the absolute part relative to the largest gradient
    entry: the NumPy path's delta = rowsum(dout * out) uses the rounded forward output,
    as the kernels do, and that error scales with the gradients."""
    tol = _grad_tol(dtype)
    atol = tol * max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got.astype(np.float64), want, atol=atol, rtol=tol, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shapes, scale", [
    (((2, 3, 37, 40), (2, 3, 53, 40), None), None),          # odd sizes
    (((2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 24)), None),  # GQA, Dv != D
    (((2, 4, 29, 24), (2, 2, 19, 24), (2, 2, 19, 40)), 0.3),  # GQA, Lq > Lk, custom scale
    (((13, 24), (17, 24), None), None),                      # 2-D
    (((21, 8), (6, 8), (6, 16)), 1.7),                       # 2-D, Lq > Lk, Dv != D
], ids=["odd", "gqa-dv", "gqa-scale", "2d", "2d-scale"])
def test_backward_numpy_path_matches_naive(dtype, causal, shapes, scale):
    dout, q, k, v, out, lse = _fwd_bwd_inputs(*shapes, dtype=dtype, causal=causal, scale=scale)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    want = _reference.attention_backward_naive(dout, q, k, v, causal=causal, scale=scale)
    assert len(grads) == 3
    for name, g, w, x in zip(("dq", "dk", "dv"), grads, want, (q, k, v)):
        assert isinstance(g, np.ndarray), name
        assert g.dtype == q.dtype, name
        assert g.shape == x.shape, name
        assert np.isfinite(g.astype(np.float64)).all(), name
        _assert_grad_close(g, w, dtype, name)


def test_backward_default_scale_is_inverse_sqrt_d():
    dout, q, k, v, out, lse = _fwd_bwd_inputs((1, 5, 24), (1, 7, 24))
    a = cuflash.attention_backward(dout, q, k, v, out, lse)
    b = cuflash.attention_backward(dout, q, k, v, out, lse, scale=1 / math.sqrt(24))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_backward_grad_arguments_strided_views():
    dout, q, k, v, out, lse = _fwd_bwd_inputs((1, 2, 5, 16), (1, 2, 7, 16), (1, 2, 7, 24))
    bufs = [np.full((1, L, 2, D), np.nan, dtype=np.float16) for L, D in ((5, 16), (7, 16), (7, 24))]
    views = [b.transpose(0, 2, 1, 3) for b in bufs]
    assert not views[0].flags.c_contiguous
    res = cuflash.attention_backward(dout, q, k, v, out, lse, dq=views[0], dk=views[1],
                                     dv=views[2])
    want = cuflash.attention_backward(dout, q, k, v, out, lse)
    for r, view, buf, w in zip(res, views, bufs, want):
        assert r is view
        assert not np.isnan(buf.astype(np.float64)).any()
        np.testing.assert_array_equal(r, w)


def test_backward_some_grad_arguments_given():
    dout, q, k, v, out, lse = _fwd_bwd_inputs((3, 6, 8), (3, 4, 8))
    dk = np.full(k.shape, np.nan, np.float16)
    dq_, dk_, dv_ = cuflash.attention_backward(dout, q, k, v, out, lse, dk=dk)
    assert dk_ is dk and not np.isnan(dk).any()
    assert dq_.shape == q.shape and dv_.shape == v.shape


def test_backward_deterministic_flag_same_result_on_numpy():
    dout, q, k, v, out, lse = _fwd_bwd_inputs((2, 4, 19, 32), (2, 2, 23, 32), causal=True)
    a = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=False)
    b = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_backward_rows_with_no_key_get_zero_dq(dtype):
    # causal, Lq = 9 > Lk = 3: query rows 0..5 see no key (bottom-right alignment)
    dout, q, k, v, out, lse = _fwd_bwd_inputs((2, 2, 9, 8), (2, 1, 3, 8), dtype=dtype,
                                              causal=True)
    assert np.isneginf(lse[..., :6]).all() and np.isfinite(lse[..., 6:]).all()
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    for g in (dq, dk, dv):
        assert np.isfinite(g.astype(np.float64)).all()
    assert (dq[..., :6, :].astype(np.float64) == 0).all()
    assert (dq[..., 6:, :].astype(np.float64) != 0).any()
    want = _reference.attention_backward_naive(dout, q, k, v, causal=True)
    for name, g, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        _assert_grad_close(g, w, dtype, name)


@pytest.mark.parametrize("shape_q, shape_k", [
    ((1, 2, 0, 8), (1, 2, 3, 8)),   # Lq = 0
    ((1, 2, 3, 8), (1, 2, 0, 8)),   # Lk = 0
    ((1, 2, 0, 8), (1, 2, 0, 8)),   # both
    ((0, 2, 3, 8), (0, 1, 4, 8)),   # no batch
    ((0, 8), (5, 8)),               # 2-D, Lq = 0
    ((4, 8), (0, 8)),               # 2-D, Lk = 0
])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_zero_sizes(shape_q, shape_k, causal):
    shape_v = shape_k[:-1] + (16,)
    dout, q, k, v, out, lse = _fwd_bwd_inputs(shape_q, shape_k, shape_v, causal=causal)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == q.dtype
        assert (g == 0).all()


# ------------------------------------------------------------------- backward errors


def _bwd_args(dtype=np.float16):
    """Small valid arguments: dout, q, k, v, out, lse (GQA, Dv != D)."""
    return list(_fwd_bwd_inputs((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 16), dtype=dtype))


_BWD_NAMES = ("dout", "q", "k", "v", "out", "lse")


class _FakeCupyArray:
    """Looks like a CuPy array to the type dispatch (module name, CUDA array interface)."""

    __cuda_array_interface__ = {}


_FakeCupyArray.__module__ = "cupy._core.core"


@pytest.mark.parametrize("name", _BWD_NAMES)
def test_backward_non_array_argument(name):
    args = _bwd_args()
    args[_BWD_NAMES.index(name)] = args[_BWD_NAMES.index(name)].tolist()
    with pytest.raises(TypeError, match=f"^{name} must be a numpy.ndarray or cupy.ndarray"):
        cuflash.attention_backward(*args)


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_backward_non_array_grad_argument(name):
    args = _bwd_args()
    with pytest.raises(TypeError, match=f"^{name} must be a numpy.ndarray or cupy.ndarray"):
        cuflash.attention_backward(*args, **{name: [[0.0]]})


@pytest.mark.parametrize("name", _BWD_NAMES + ("dq", "dk", "dv"))
def test_backward_mixed_numpy_and_cupy(name):
    args = _bwd_args()
    kwargs = {}
    if name in _BWD_NAMES:
        args[_BWD_NAMES.index(name)] = _FakeCupyArray()
    else:
        kwargs[name] = _FakeCupyArray()
    with pytest.raises(TypeError, match=f"all be NumPy or all be CuPy.*\\b{name}: cupy"):
        cuflash.attention_backward(*args, **kwargs)


@pytest.mark.parametrize("dtype", [np.float64, np.int16])
def test_backward_unsupported_dtype(dtype):
    dout, q, k, v, out, lse = _bwd_args()
    with pytest.raises(TypeError, match="q.dtype must be float16, bfloat16 or float32"):
        cuflash.attention_backward(dout, q.astype(dtype), k, v, out, lse)
    with pytest.raises(TypeError, match="share one dtype"):
        cuflash.attention_backward(dout, q, k, v.astype(BF16), out, lse)


@pytest.mark.parametrize("name", ["dout", "out"])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_backward_dout_out_dtype(name, dtype):
    args = _bwd_args()
    i = _BWD_NAMES.index(name)
    args[i] = args[i].astype(dtype)
    with pytest.raises(TypeError, match=f"^{name}.dtype must be float16 \\(the dtype of q\\)"):
        cuflash.attention_backward(*args)


@pytest.mark.parametrize("name", ["dout", "out"])
@pytest.mark.parametrize("shape", [(2, 4, 5, 8), (2, 4, 4, 16), (4, 5, 16), (2, 2, 5, 16)])
def test_backward_dout_out_shape(name, shape):
    args = _bwd_args()
    args[_BWD_NAMES.index(name)] = np.zeros(shape, np.float16)
    with pytest.raises(ValueError, match=f"^{name} must have shape \\(2, 4, 5, 16\\)"):
        cuflash.attention_backward(*args)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, BF16])
def test_backward_lse_dtype(dtype):
    dout, q, k, v, out, lse = _bwd_args()
    with pytest.raises(TypeError, match="^lse.dtype must be float32"):
        cuflash.attention_backward(dout, q, k, v, out, lse.astype(dtype))


@pytest.mark.parametrize("shape", [(2, 4, 6), (2, 4, 5, 1), (2, 4), (4, 5), (2, 2, 5)])
def test_backward_lse_shape(shape):
    dout, q, k, v, out, _ = _bwd_args()
    with pytest.raises(ValueError, match="^lse must have shape \\(2, 4, 5\\)"):
        cuflash.attention_backward(dout, q, k, v, out, np.zeros(shape, np.float32))


def test_backward_lse_any_strides():
    dout, q, k, v, out, lse = _bwd_args()
    buf = np.full((5, 2, 4, 3), np.nan, np.float32)
    view = buf[..., 1].transpose(1, 2, 0)
    view[...] = lse
    a = cuflash.attention_backward(dout, q, k, v, out, lse)
    b = cuflash.attention_backward(dout, q, k, v, out, view)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name, shape", [
    ("dq", (2, 4, 5, 16)), ("dq", (2, 2, 5, 8)), ("dq", (4, 5, 8)),
    ("dk", (2, 4, 6, 8)), ("dk", (2, 2, 6, 16)),
    ("dv", (2, 2, 6, 8)), ("dv", (2, 4, 6, 16)), ("dv", (2, 2, 5, 16)),
])
def test_backward_grad_argument_shape(name, shape):
    args = _bwd_args()
    with pytest.raises(ValueError, match=f"^{name} must have shape"):
        cuflash.attention_backward(*args, **{name: np.zeros(shape, np.float16)})


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_backward_grad_argument_dtype(name, dtype):
    args = _bwd_args()
    shape = {"dq": args[1].shape, "dk": args[2].shape, "dv": args[3].shape}[name]
    with pytest.raises(TypeError, match=f"^{name}.dtype must be float16 \\(the dtype of q\\)"):
        cuflash.attention_backward(*args, **{name: np.zeros(shape, dtype)})


def test_backward_grad_argument_dtype_follows_q_bf16():
    args = _bwd_args(BF16)
    with pytest.raises(TypeError, match="^dk.dtype must be bfloat16"):
        cuflash.attention_backward(*args, dk=np.zeros(args[2].shape, np.float16))


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_backward_grad_argument_non_contiguous_last_dim(name):
    args = _bwd_args()
    shape = {"dq": args[1].shape, "dk": args[2].shape, "dv": args[3].shape}[name]
    strided = np.zeros(shape[:-1] + (2 * shape[-1],), np.float16)[..., ::2]
    with pytest.raises(ValueError, match=f"^{name} must have a contiguous last dimension"):
        cuflash.attention_backward(*args, **{name: strided})


@pytest.mark.parametrize("name", ["dout", "q", "k", "v", "out"])
def test_backward_input_non_contiguous_last_dim(name):
    args = _bwd_args()
    i = _BWD_NAMES.index(name)
    x = args[i]
    wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    wide[..., ::2] = x
    args[i] = wide[..., ::2]
    with pytest.raises(ValueError, match=f"^{name} must have a contiguous last dimension"):
        cuflash.attention_backward(*args)


@pytest.mark.parametrize("shapes, match", [
    (((2, 4, 5, 8), (2, 2, 6, 9), (2, 2, 6, 16)), "q and k head_dim differ"),
    (((2, 3, 5, 8), (2, 2, 6, 8), (2, 2, 6, 16)), "multiple of k/v heads"),
    (((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 7, 16)), "k and v sequence lengths differ"),
    (((2, 4, 5, 8), (3, 2, 6, 8), (3, 2, 6, 16)), "leading \\(batch\\) dims differ"),
])
def test_backward_bad_qkv_shapes(shapes, match):
    q, k, v = _qkv(*shapes)
    dout = np.zeros(q.shape[:-1] + v.shape[-1:], np.float16)
    lse = np.zeros(q.shape[:-1], np.float32)
    with pytest.raises(ValueError, match=match):
        cuflash.attention_backward(dout, q, k, v, dout.copy(), lse)


@pytest.mark.parametrize("scale, exc", [("0.1", TypeError), (float("nan"), ValueError),
                                        (float("-inf"), ValueError), (True, TypeError)])
def test_backward_bad_scale(scale, exc):
    with pytest.raises(exc, match="^scale"):
        cuflash.attention_backward(*_bwd_args(), scale=scale)


@pytest.mark.parametrize("name", ["causal", "deterministic"])
@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0])
def test_backward_bad_flags(name, value):
    with pytest.raises(TypeError, match=f"^{name} must be a bool"):
        cuflash.attention_backward(*_bwd_args(), **{name: value})


def test_backward_numpy_bool_flags_accepted():
    args = _bwd_args()
    a = cuflash.attention_backward(*args, deterministic=np.bool_(True))
    b = cuflash.attention_backward(*args)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_backward_unknown_options_are_named():
    with pytest.raises(ValueError, match="dropout_p must be in"):
        cuflash.attention_backward(*_bwd_args(), dropout_p=1.0, seed=3)
    with pytest.raises(TypeError, match="alibi, windows"):
        cuflash.attention_backward(*_bwd_args(), windows=(4, 0), alibi=None)


def test_backward_outputs_must_not_overlap_inputs():
    q, k, v = _qkv((1, 2, 9, 16), (1, 2, 11, 16))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    dout = np.ones_like(out)
    with pytest.raises(ValueError, match="dk overlaps k"):
        cuflash.attention_backward(dout, q, k, v, out, lse, dk=k)
    buf = np.empty((2,) + q.shape, dtype=q.dtype)
    with pytest.raises(ValueError, match="dq overlaps dout"):
        cuflash.attention_backward(dout, q, k, v, out, lse, dq=dout)
    # disjoint halves of one buffer are fine
    dq, _, _ = cuflash.attention_backward(dout, q, k, v, out, lse, dq=buf[0])
    assert dq is buf[0] or np.shares_memory(dq, buf[0])


def test_float32_numpy_path_keeps_float32():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 9, 8), (2, 2, 11, 8),
                                                                   (2, 2, 11, 8)))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    ref, _ = _reference.attention_naive(q, k, v, causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    grads = cuflash.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
    assert all(g.dtype == np.float32 for g in grads)
