"""GPU correctness of the options kernels: sliding window, softcap, ALiBi, dropout (marked
``gpu``). tests/test_dropout_gpu.py checks the dropout mask itself.

Same rule as the forward and backward tests: against a float64 reference with the same
options, the error of out, lse, dq, dk and dv may be at most twice that of a plain
same-precision implementation (``gpu_util.scores`` rounds where it would), plus 1e-5.
Outputs and gradients are poisoned (NaN) before each call.
"""

import contextlib
import math

import numpy as np
import pytest

import cuflash
from gpu_util import (DTYPES, GRADS, KERNEL_PATHS, check_grads, kernel_path, max_err,
                      random_array, random_qkv, reference, to_f32, visible)
from gpu_util import cp, poison_allocator  # noqa: F401

pytestmark = pytest.mark.gpu

HEAD_DIMS = (40, 64, 128, 256)
SEQLENS = ((1, 1), (1, 239), (113, 203), (239, 1), (512, 256), (1023, 1024))

# (causal, options); "slopes" stands for per-head ALiBi slopes, "slopes_bh" for per
# (batch, head) ones, made for the case's shapes; "random" for a fresh 64-bit seed.
OPTION_SETS = {
    "sliding": (True, {"window": (64, -1)}),
    "window": (False, {"window": (17, 33)}),
    "softcap": (False, {"softcap": 0.8}),
    "alibi": (False, {"alibi_slopes": "slopes"}),
    "dropout": (False, {"dropout_p": 0.17, "seed": "random"}),
    "all": (True, {"window": (100, -1), "softcap": 2.0, "alibi_slopes": "slopes_bh"}),
    "all_dropout": (True, {"window": (100, -1), "softcap": 2.0, "alibi_slopes": "slopes_bh",
                           "dropout_p": 0.4, "seed": "random"}),
}


def slopes(cp, shape):
    """ALiBi's geometric slopes, shape ``shape`` (last dim: heads), float32."""
    h = shape[-1]
    base = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
    return cp.asarray(np.broadcast_to(base, shape), dtype=cp.float32)


def make_options(cp, opts, shape_q):
    out = dict(opts)
    if out.get("seed") == "random":
        out["seed"] = int(np.random.default_rng().integers(0, 2**64, dtype=np.uint64))
    if out.get("alibi_slopes") == "slopes":
        out["alibi_slopes"] = slopes(cp, shape_q[-3:-2])
    elif out.get("alibi_slopes") == "slopes_bh":
        out["alibi_slopes"] = slopes(cp, shape_q[:-2])
    return out


def ref_options(cp, opts, shape_q, seqlen_k):
    """The options as the float64 reference takes them (slopes as lead + (Hq,), dropout as
    the keep mask of cuflash/_dropout.py, the NumPy definition)."""
    out = dict(opts)
    if out.get("dropout_p"):
        from cuflash import _dropout

        heads = shape_q[-3] if len(shape_q) > 2 else 1
        batch = math.prod(shape_q[:-3])
        mask = _dropout.keep_mask(out.pop("seed"), out["dropout_p"], batch, heads,
                                  shape_q[-2], seqlen_k)
        out["dropout_mask"] = mask.reshape(tuple(shape_q[:-2]) + mask.shape[-2:])
    else:
        out.pop("dropout_p", None)
        out.pop("seed", None)
    if out.get("alibi_slopes") is not None:
        slopes = out["alibi_slopes"]
        out["alibi_slopes"] = (slopes.reshape(()) if len(shape_q) == 2
                               else cp.broadcast_to(slopes, shape_q[:-2]))
    return out


def check_forward(cp, q, k, v, name, causal, opts, out=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, out=out, **opts)
    o32 = to_f32(cp, o)
    assert not bool(cp.isnan(o32).any()), "NaN (or an unwritten element) in out"
    assert not bool(cp.isnan(lse).any()), "NaN (or an unwritten element) in lse"
    q32, k32, v32 = (to_f32(cp, x) for x in (q, k, v))
    ropts = ref_options(cp, opts, q.shape, k.shape[-2])
    ref_o, ref_lse = reference(cp, q32, k32, v32, causal, scale, **ropts)
    pl_o, pl_lse = reference(cp, q32, k32, v32, causal, scale, plain_dtype=name, **ropts)
    err_o, tol_o = max_err(cp, o32, ref_o), 2 * max_err(cp, pl_o, ref_o) + 1e-5
    err_l, tol_l = max_err(cp, lse, ref_lse), 2 * max_err(cp, pl_lse, ref_lse) + 1e-5
    assert err_o <= tol_o, f"out error {err_o:.3g} > {tol_o:.3g}"
    assert err_l <= tol_l, f"lse error {err_l:.3g} > {tol_l:.3g}"
    empty = ~visible(cp, q.shape[-2], k.shape[-2], causal, opts.get("window")).any(axis=1)
    if bool(empty.any()):
        assert bool((o32[..., empty, :] == 0).all())
        assert bool(cp.isneginf(lse[..., empty]).all())
    return o, lse


def check_case(cp, name, shape_q, shape_k, causal, opts, rng, path=None, **bwd_kwargs):
    """Forward and backward of one case; ``path``: run on that kernel family (gpu_util.
    kernel_path) and, for "sm90", check that the Hopper kernels ran where they cover the
    call (head dims of whole 16-byte rows; the backward with atomic dQ)."""
    q, k, v = random_qkv(cp, shape_q, shape_k, shape_k, name, rng)
    opts = make_options(cp, opts, shape_q)
    family = kernel_path(cp, path) if path else contextlib.nullcontext([])
    with family as launched:
        o, lse = check_forward(cp, q, k, v, name, causal, opts)
        dout = random_array(cp, o.shape, name, rng)
        grads = cuflash.attention_backward(dout, q, k, v, o, lse, causal=causal, **opts,
                                           **bwd_kwargs)
    check_grads(cp, grads, q, k, v, dout, o, name, causal,
                **ref_options(cp, opts, shape_q, shape_k[-2]))
    if path == "sm90":
        d, kinds = shape_q[-1], [kind for kind, _ in launched]
        assert ("fwd" in kinds) == (d % 8 == 0), kinds
        assert ("bwd" in kinds) == (d % 8 == 0 and not bwd_kwargs.get("deterministic")), kinds
    return q, k, v, o, lse, dout, opts, grads


def batch_for(Lq, Lk):
    """Batch size of a grid case: one-row or one-key cases get more rows (with causal, a
    single key is seen by a single query of each head), so that the max error is not a
    toss-up: there dS is rounding noise around 0, in ours and in the plain reference."""
    return max(2, 32 // min(Lq, Lk))


@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("option_set", OPTION_SETS)
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_options_grid(cp, path, name, option_set, head_dim, seqlens):
    """B=2, Hq=4, Hk=2 (GQA), forward and backward with each option set, on both kernel
    families."""
    causal, opts = OPTION_SETS[option_set]
    Lq, Lk = seqlens
    B = batch_for(Lq, Lk)
    check_case(cp, name, (B, 4, Lq, head_dim), (B, 2, Lk, head_dim), causal, opts,
               np.random.default_rng(), path=path)


@pytest.mark.parametrize("seqlens", ((113, 203), (239, 1), (1023, 1024)),
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", (64, 128, 256))
@pytest.mark.parametrize("option_set", OPTION_SETS)
@pytest.mark.parametrize("name", DTYPES)
def test_options_grid_deterministic(cp, name, option_set, head_dim, seqlens):
    causal, opts = OPTION_SETS[option_set]
    Lq, Lk = seqlens
    B = batch_for(Lq, Lk) // 2
    check_case(cp, name, (B, 4, Lq, head_dim), (B, 2, Lk, head_dim), causal, opts,
               np.random.default_rng(), deterministic=True)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("window", [(0, 0), (0, -1), (-1, 5), (3000, 3000), (5, 5)])
def test_window_edges(cp, window, path):
    """Degenerate and oversized windows; Lq != Lk, so alignment matters."""
    check_case(cp, "bfloat16", (1, 2, 300, 64), (1, 2, 450, 64), False, {"window": window},
               np.random.default_rng(), path=path)
    check_case(cp, "float16", (1, 2, 450, 96), (1, 2, 300, 96), False, {"window": window},
               np.random.default_rng(), path=path)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_window_rows_that_see_nothing(cp, path):
    """Lq > Lk with window (0, 0): the first Lq - Lk rows see no key: out 0, lse -inf, dq 0."""
    q, k, v, o, lse, dout, opts, grads = check_case(
        cp, "float16", (1, 2, 400, 128), (1, 2, 130, 128), False, {"window": (0, 0)},
        np.random.default_rng(), path=path)
    assert bool((to_f32(cp, grads[0])[:, :, :270] == 0).all())


def test_options_deterministic_bitwise(cp):
    rng = np.random.default_rng()
    opts = {"window": (200, 10), "softcap": 3.0, "alibi_slopes": slopes(cp, (8,))}
    q, k, v = random_qkv(cp, (2, 8, 700, 128), (2, 2, 900, 128), (2, 2, 900, 128), "bfloat16",
                         rng)
    o, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    dout = random_array(cp, o.shape, "bfloat16", rng)
    first = cuflash.attention_backward(dout, q, k, v, o, lse, deterministic=True, **opts)
    for _ in range(9):
        again = cuflash.attention_backward(dout, q, k, v, o, lse, deterministic=True, **opts)
        for label, a, b in zip(GRADS, again, first):
            assert bool((a.view(cp.uint16) == b.view(cp.uint16)).all()), label


@pytest.mark.parametrize("name", DTYPES)
def test_options_strided_bshd_and_unaligned(cp, name):
    """(B, L, H, D) views, a head dim off the buckets (72) and a 2-D case."""
    rng = np.random.default_rng()
    B, L, D = 2, 333, 72
    q, k, v = random_qkv(cp, (B, L, 4, D), (B, L + 9, 2, D), (B, L + 9, 2, D), name, rng)
    tr = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    opts = {"window": (50, 20), "softcap": 1.5, "alibi_slopes": slopes(cp, (B, 4))}
    o, lse = check_forward(cp, tr(q), tr(k), tr(v), name, False, opts)
    dout = random_array(cp, o.shape, name, rng)
    grads = cuflash.attention_backward(dout, tr(q), tr(k), tr(v), o, lse, **opts)
    check_grads(cp, grads, tr(q), tr(k), tr(v), dout, o, name, False,
                **ref_options(cp, opts, tr(q).shape, tr(k).shape[-2]))
    q2, k2, v2 = random_qkv(cp, (90, 64), (120, 64), (120, 64), name, rng)
    check_forward(cp, q2, k2, v2, name, True, {"window": (10, -1), "softcap": 1.0,
                                               "alibi_slopes": slopes(cp, (1,))})


def test_options_batch_dims_and_empty(cp):
    """Two leading batch dims with per-(batch, head) slopes; Lq = 0 and Lk = 0."""
    rng = np.random.default_rng()
    shape_q, shape_k = (2, 3, 4, 77, 64), (2, 3, 1, 99, 64)
    check_case(cp, "float16", shape_q, shape_k, True,
               {"softcap": 1.0, "alibi_slopes": "slopes_bh", "window": (30, -1)}, rng)
    for lq, lk in ((0, 5), (5, 0)):
        q, k, v = random_qkv(cp, (1, 2, lq, 64), (1, 2, lk, 64), (1, 2, lk, 64), "float16", rng)
        o, lse = cuflash.attention(q, k, v, return_lse=True, window=(3, 3), softcap=1.0)
        assert o.shape == (1, 2, lq, 64) and bool((to_f32(cp, o) == 0).all())
        dout = random_array(cp, o.shape, "float16", rng)
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, o, lse, window=(3, 3),
                                                softcap=1.0)
        for g in (dq, dk, dv):
            assert bool((to_f32(cp, g) == 0).all())


@pytest.mark.parametrize("scale", (-0.25, 0.0))
def test_options_nonpositive_scale(cp, scale):
    rng = np.random.default_rng()
    for opts in ({"window": (30, 4)}, {"softcap": 1.5, "alibi_slopes": "slopes"}):
        q, k, v = random_qkv(cp, (1, 4, 140, 64), (1, 2, 170, 64), (1, 2, 170, 64), "float16",
                             rng)
        opts = make_options(cp, opts, q.shape)
        o, lse = cuflash.attention(q, k, v, causal=True, scale=scale, return_lse=True, **opts)
        dout = random_array(cp, o.shape, "float16", rng)
        for det in (False, True):
            grads = cuflash.attention_backward(dout, q, k, v, o, lse, causal=True, scale=scale,
                                               deterministic=det, **opts)
            check_grads(cp, grads, q, k, v, dout, o, "float16", True, scale=scale,
                        **ref_options(cp, opts, q.shape, k.shape[-2]))


def test_options_match_numpy_path(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 129, 80), (1, 2, 131, 80), (1, 2, 131, 80), "float16", rng)
    for opts in ({"window": (20, 7), "softcap": 1.2},
                 {"window": (20, 7), "dropout_p": 0.2, "seed": 2**64 - 5}):
        gpu_o = cuflash.attention(q, k, v, alibi_slopes=slopes(cp, (2,)), **opts)
        cpu_o = cuflash.attention(q.get(), k.get(), v.get(), alibi_slopes=slopes(np, (2,)),
                                  **opts)
        np.testing.assert_allclose(to_f32(cp, gpu_o).get(), cpu_o.astype(np.float32),
                                   atol=4e-3)


def test_plain_options_use_the_plain_kernels(cp):
    """window (-1, 0) is causal and (-1, -1) is none: the same bits as the plain call."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 200, 64), (1, 2, 260, 64), (1, 2, 260, 64), "float16", rng)
    a = cuflash.attention(q, k, v, causal=True)
    b = cuflash.attention(q, k, v, window=(-1, 0), softcap=0.0)
    assert bool((a.view(cp.uint16) == b.view(cp.uint16)).all())
