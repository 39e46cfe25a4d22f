"""GPU correctness of the fused backward kernel (marked ``gpu``; skipped without a GPU).

Tolerance rule (as in flash-attention's tests): against a float64 closed-form reference,
the error of each of ``dq``, ``dk`` and ``dv`` may be at most twice the error of a plain
implementation at the input precision (float32 arithmetic with S, P, dP, dS and the
gradients rounded to fp16/bf16), plus 1e-5. ``out`` and ``lse`` come from
``cuflash.attention``; ``dout`` is standard normal in the input dtype.
Gradients are poisoned (NaN) before each call, so an unwritten element fails the test.
"""

import numpy as np
import pytest

import cuflash
from gpu_util import (DTYPES, GRADS, HEAD_DIMS, KERNEL_PATHS, SEQLENS, check_grads,
                      kernel_path, random_array, random_qkv, to_f32)
from gpu_util import cp, poison_allocator  # noqa: F401

pytestmark = pytest.mark.gpu

DET_HEAD_DIMS = (40, 64, 128, 256)
DET_SEQLENS = ((1, 239), (113, 203), (239, 1), (1023, 1024))


def bhsd(x):
    """(B, L, H, D) <-> (B, H, L, D), as a view."""
    return x.transpose(0, 2, 1, 3)


def same_bits(cp, a, b):
    return bool((a.view(cp.uint16) == b.view(cp.uint16)).all())


def all_poison(cp, x):
    """Every element still holds the allocator's 0xFFFF pattern (never written)."""
    return bool((x.view(cp.uint16) == 0xFFFF).all())


def check_backward(cp, q, k, v, name, causal, rng, *, scale=None, dout=None, out=None,
                   **kwargs):
    """Forward (into ``out`` if given), then backward (kwargs: deterministic, dq, dk, dv)."""
    o, lse = cuflash.attention(q, k, v, causal=causal, scale=scale, return_lse=True, out=out)
    if dout is None:
        dout = random_array(cp, o.shape, name, rng)
    grads = cuflash.attention_backward(dout, q, k, v, o, lse, causal=causal, scale=scale,
                                       **kwargs)
    check_grads(cp, grads, q, k, v, dout, o, name, causal, scale)
    return grads


@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_backward_grid(cp, path, name, causal, head_dim, seqlens):
    with kernel_path(cp, path) as launched:
        check_grid_case(cp, name, causal, head_dim, seqlens)
    if path == "sm90":  # the Hopper backward covers head dims of 16-byte rows (above 128:
        bwd = [s for kind, s in launched if kind == "bwd"]  # the wide kernel)
        assert bool(bwd) == (head_dim % 8 == 0)
        assert all(s.wide == (head_dim > 128) for s in bwd)


@pytest.mark.parametrize("head_dim", (64, 128, 256))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_backward_long_sequences(cp, causal, head_dim):
    """A long call on the sm_90a backward (the grid's lengths stay below 2k): blocks of
    about 50 to 80 steps."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 3000, head_dim), (1, 2, 5001, head_dim),
                         (1, 2, 5001, head_dim), "bfloat16", rng)
    with kernel_path(cp, "sm90") as launched:
        check_backward(cp, q, k, v, "bfloat16", causal, rng)
    assert [kind for kind, _ in launched] == ["fwd", "bwd"]


@pytest.mark.parametrize("head_dim", (160, 256))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_backward_wide_gqa_split(cp, causal, head_dim):
    """The sm_90a wide backward (head dims above 128) with GQA 4:1 on few key tiles, so that
    each group is split over several blocks (float32 partial dK and dV, then converted), on
    (B, L, H, D) views; 160 rounds up to 256, whose last column block lies past the rows."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 300, 8, head_dim), (2, 333, 2, head_dim),
                         (2, 333, 2, head_dim), "bfloat16", rng)
    tr = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    with kernel_path(cp, "sm90") as launched:
        check_backward(cp, tr(q), tr(k), tr(v), "bfloat16", causal, rng)
    bwd = [s for kind, s in launched if kind == "bwd"]
    assert bwd and all(s.wide for s in bwd)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_backward_gqa_strided_paths(cp, path, causal):
    """GQA 4:1 on (B, L, H, D) views with odd lengths, on both kernel families."""
    rng = np.random.default_rng()
    for name, D, Lq, Lk in (("bfloat16", 128, 333, 1000), ("float16", 64, 1000, 77)):
        q, k, v = random_qkv(cp, (2, Lq, 8, D), (2, Lk, 2, D), (2, Lk, 2, D), name, rng)
        tr = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        with kernel_path(cp, path) as launched:
            check_backward(cp, tr(q), tr(k), tr(v), name, causal, rng)
        assert any(kind == "bwd" for kind, _ in launched) == (path == "sm90")


def check_grid_case(cp, name, causal, head_dim, seqlens, **kwargs):
    """One (B, H=2) case of the grid; kwargs go to attention_backward. B = 1, except that a
    one-row Lq gets 16 batch rows: the rule compares maxima, and over a handful of
    elements each maximum is a single rounding, which makes the 2x comparison a toss-up."""
    rng = np.random.default_rng()
    Lq, Lk = seqlens
    B, H = max(1, 16 // max(Lq, 1)), 2
    q, k, v = random_qkv(cp, (B, H, Lq, head_dim), (B, H, Lk, head_dim), (B, H, Lk, head_dim),
                         name, rng)
    check_backward(cp, q, k, v, name, causal, rng, **kwargs)


@pytest.mark.parametrize("seqlens", DET_SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", DET_HEAD_DIMS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_backward_grid_deterministic(cp, path, name, causal, head_dim, seqlens):
    """deterministic=True meets the same tolerance, on both kernel families."""
    with kernel_path(cp, path) as launched:
        check_grid_case(cp, name, causal, head_dim, seqlens, deterministic=True)
    if path == "sm90":
        assert any(kind == "bwd" for kind, _ in launched)


@pytest.mark.parametrize("case", (
    ("float16", True, (2, 4, 1000, 128), (2, 4, 1000, 128), {}),
    ("bfloat16", False, (2, 8, 777, 64), (2, 2, 1001, 64), {}),
    # many key tiles a dQ tile: atomics in any order would differ between runs
    ("bfloat16", False, (1, 8, 4096, 128), (1, 8, 4096, 128), {}),
    ("float16", True, (2, 8, 3000, 64), (2, 2, 3100, 64), {"window": (700, 0)}),
    # more queries than keys (the first 500 rows see none), and a window to the right only
    ("bfloat16", True, (1, 4, 1500, 64), (1, 4, 1000, 64), {}),
    ("float16", False, (1, 4, 1000, 128), (1, 4, 1500, 128), {"window": (0, 300)}),
    # the wide kernel (sm_90): turns per warpgroup's column half
    ("bfloat16", True, (1, 4, 1000, 256), (1, 4, 1100, 256), {}),
    ("float16", False, (2, 4, 700, 192), (2, 2, 900, 192), {"softcap": 5.0}),
), ids=("causal", "gqa", "long", "gqa-window", "lq-gt-lk", "right-window", "wide",
        "wide-gqa-softcap"))
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_backward_deterministic_bitwise(cp, path, case):
    """deterministic=True: dq, dk, dv bit-identical over 10 runs, on both kernel families."""
    name, causal, shape_q, shape_k, opts = case
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, shape_q, shape_k, shape_k, name, rng)
    with kernel_path(cp, path) as launched:
        o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **opts)
        dout = random_array(cp, o.shape, name, rng)

        def run():
            return cuflash.attention_backward(dout, q, k, v, o, lse, causal=causal,
                                              deterministic=True, **opts)

        first = run()
        check_grads(cp, first, q, k, v, dout, o, name, causal, **opts)
        for _ in range(9):
            again = run()
            for label, a, b in zip(GRADS, again, first):
                assert same_bits(cp, a, b), f"{label} differs between deterministic runs"
    assert any(kind == "bwd" for kind, _ in launched) == (path == "sm90")


@pytest.mark.parametrize("heads", ((4, 4), (4, 2)), ids=("mha", "gqa"))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("name", DTYPES)
def test_backward_strided_bshd(cp, name, causal, heads):
    """(B, L, H, D) buffers passed as transposed views; dq, dk, dv written into such views."""
    rng = np.random.default_rng()
    B, L, D = 2, 300, 64
    Hq, Hk = heads
    q, k, v = random_qkv(cp, (B, L, Hq, D), (B, L + 17, Hk, D), (B, L + 17, Hk, D), name, rng)
    dout = random_array(cp, (B, L, Hq, D), name, rng)
    out_buf = cp.empty((B, L, Hq, D), dtype=q.dtype)
    bufs = [cp.empty(x.shape, dtype=x.dtype) for x in (q, k, v)]
    grads = check_backward(cp, bhsd(q), bhsd(k), bhsd(v), name, causal, rng, dout=bhsd(dout),
                           out=bhsd(out_buf), dq=bhsd(bufs[0]), dk=bhsd(bufs[1]),
                           dv=bhsd(bufs[2]))
    for label, g, buf in zip(GRADS, grads, bufs):
        assert g.data.ptr == buf.data.ptr, f"{label} is not the given buffer"
        assert g.strides == bhsd(buf).strides


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("head_dim", (33, 72, 100))
def test_backward_unaligned(cp, head_dim, causal):
    """Head dims off the power-of-two buckets (33: not a multiple of 8)."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 3, 77, head_dim), (2, 3, 131, head_dim), (2, 3, 131, head_dim),
                         "float16", rng)
    check_backward(cp, q, k, v, "float16", causal, rng)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_backward_gqa_and_batch_dims(cp, causal):
    """dk, dv summed over each group of 4 query heads, with two leading batch dims."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 3, 8, 97, 64), (2, 3, 2, 150, 64), (2, 3, 2, 150, 64),
                         "bfloat16", rng)
    check_backward(cp, q, k, v, "bfloat16", causal, rng)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_backward_mqa(cp, causal):
    """One key/value head shared by all 8 query heads."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 8, 120, 128), (2, 1, 200, 128), (2, 1, 200, 128), "float16",
                         rng)
    check_backward(cp, q, k, v, "float16", causal, rng)


def test_backward_unmergeable_batch(cp):
    """Leading dims whose strides cannot merge, for inputs and for dq=, dk=, dv=."""
    rng = np.random.default_rng()
    shape = (3, 4, 2, 65, 32)
    base = random_qkv(cp, shape, shape, shape, "float16", rng)
    q, k, v = (x[:, ::2] for x in base)
    dout = random_array(cp, shape, "float16", rng)[:, ::2]
    bufs = [cp.empty(shape, dtype=q.dtype) for _ in range(3)]
    grads = check_backward(cp, q, k, v, "float16", True, rng, dout=dout, dq=bufs[0][:, ::2],
                           dk=bufs[1][:, ::2], dv=bufs[2][:, ::2])
    for label, g, buf in zip(GRADS, grads, bufs):
        assert g.data.ptr == buf.data.ptr, f"{label} is not the given buffer"
        assert all_poison(cp, buf[:, 1::2]), f"{label} written outside its view"


def test_backward_2d(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (70, 64), (90, 64), (90, 64), "float16", rng)
    check_backward(cp, q, k, v, "float16", True, rng)
    q, k, v = random_qkv(cp, (130, 96), (50, 96), (50, 96), "bfloat16", rng)
    check_backward(cp, q, k, v, "bfloat16", False, rng)


def test_backward_fully_masked_rows(cp):
    """Lq > Lk with causal: the first Lq - Lk rows see no key and get dq exactly 0."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 300, 128), (1, 2, 40, 128), (1, 2, 40, 128), "bfloat16", rng)
    dq, dk, dv = check_backward(cp, q, k, v, "bfloat16", True, rng)
    assert bool((to_f32(cp, dq)[:, :, :260] == 0).all())
    assert bool(cp.isfinite(to_f32(cp, dk)).all()) and bool(cp.isfinite(to_f32(cp, dv)).all())


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_backward_empty(cp, causal):
    """Lq = 0: dk, dv exactly zero. Lk = 0: dq exactly zero. Shapes as the inputs'."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 0, 64), (1, 2, 5, 64), (1, 2, 5, 64), "float16", rng)
    o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    dout = random_array(cp, o.shape, "float16", rng)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, o, lse, causal=causal)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert bool((to_f32(cp, dk) == 0).all()) and bool((to_f32(cp, dv) == 0).all())

    q, k, v = random_qkv(cp, (1, 2, 5, 64), (1, 2, 0, 64), (1, 2, 0, 64), "bfloat16", rng)
    o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    dout = random_array(cp, o.shape, "bfloat16", rng)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, o, lse, causal=causal)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert bool((to_f32(cp, dq) == 0).all())


@pytest.mark.parametrize("name", DTYPES)
def test_backward_custom_scale(cp, name):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 200, 64), (1, 2, 250, 64), (1, 2, 250, 64), name, rng)
    check_backward(cp, q, k, v, name, True, rng, scale=0.3)
    check_backward(cp, q, k, v, name, False, rng, scale=0.3, deterministic=True)


@pytest.mark.parametrize("scale", (-0.3, 0.0))
@pytest.mark.parametrize("deterministic", (False, True), ids=("atomic", "det"))
def test_backward_nonpositive_scale(cp, scale, deterministic):
    """scale <= 0 with masked tiles (causal diagonal, ragged ends): hidden scores must give
    P = 0, never exp2(-inf * scale) = +inf or NaN."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 150, 64), (1, 2, 213, 64), (1, 2, 213, 64), "bfloat16", rng)
    check_backward(cp, q, k, v, "bfloat16", True, rng, scale=scale, deterministic=deterministic)


def test_backward_matches_numpy_path(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 129, 80), (1, 2, 131, 80), (1, 2, 131, 80), "float16", rng)
    o, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = random_array(cp, o.shape, "float16", rng)
    gpu = cuflash.attention_backward(dout, q, k, v, o, lse, causal=True)
    cpu = cuflash.attention_backward(dout.get(), q.get(), k.get(), v.get(), o.get(), lse.get(),
                                     causal=True)
    for label, g, c in zip(GRADS, gpu, cpu):
        assert isinstance(c, np.ndarray) and c.dtype == g.dtype and c.shape == g.shape
        np.testing.assert_allclose(g.get().astype(np.float32), c.astype(np.float32),
                                   atol=1e-2, rtol=1e-2, err_msg=label)
