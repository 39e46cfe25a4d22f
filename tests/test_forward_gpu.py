"""GPU correctness of the fused forward kernel (marked ``gpu``; skipped without a GPU).

Tolerance rule (as in flash-attention's tests): against a float64 reference, the error of
``out`` and ``lse`` may be at most twice the error of a plain implementation at the input
precision (scores and P rounded to fp16/bf16, softmax in fp32), plus 1e-5.
Outputs are poisoned (NaN) before each call, so an unwritten element fails the test.
"""

import math

import numpy as np
import pytest

import cuflash

pytestmark = pytest.mark.gpu

DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 192, 256)
SEQLENS = ((1, 1), (1, 239), (113, 203), (128, 217), (239, 1), (512, 256), (1023, 1024),
           (1024, 1023), (2048, 2048))


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(autouse=True)
def poison_allocator(cp):
    """Every CuPy allocation starts as 0xFF bytes: NaN in fp16, bf16 and fp32."""
    pool = cp.cuda.MemoryPool()

    def alloc(nbytes):
        mem = pool.malloc(nbytes)
        cp.cuda.runtime.memsetAsync(mem.ptr, 0xFF, nbytes, cp.cuda.get_current_stream().ptr)
        return mem

    cp.cuda.set_allocator(alloc)
    yield
    cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)


def _dtype(name):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float16)


def round_to(cp, x32, name):
    """float32 -> nearest fp16/bf16 value, returned as float32."""
    if name == "float16":
        return x32.astype(cp.float16).astype(cp.float32)
    u = x32.view(cp.uint32)
    u = (u + (cp.uint32(0x7FFF) + ((u >> 16) & 1))) & cp.uint32(0xFFFF0000)
    return u.view(cp.float32)


def to_dtype(cp, x32, name):
    """float32 array -> fp16/bf16 array (bf16 through its bit pattern)."""
    if name == "float16":
        return x32.astype(cp.float16)
    bits = (round_to(cp, x32, name).view(cp.uint32) >> 16).astype(cp.uint16)
    return bits.view(_dtype(name))


def to_f32(cp, x):
    if x.dtype == np.float16:
        return x.astype(cp.float32)
    return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)


def random_qkv(cp, shape_q, shape_k, shape_v, name, rng):
    out = []
    for shape in (shape_q, shape_k, shape_v):
        x = cp.asarray(rng.standard_normal(shape, dtype=np.float32))
        out.append(to_dtype(cp, x, name))
    return out


def visible(cp, Lq, Lk, causal):
    i = cp.arange(Lq)[:, None]
    j = cp.arange(Lk)[None, :]
    return (j <= i + Lk - Lq) if causal else cp.ones((Lq, Lk), dtype=bool)


def reference(cp, q, k, v, causal, scale, plain_dtype=None):
    """float64 attention (plain_dtype None), or the plain same-precision version."""
    f = (lambda x: x.astype(cp.float64)) if plain_dtype is None else (lambda x: x)
    q, k, v = f(q), f(k), f(v)
    rep = q.shape[-3] // k.shape[-3] if q.ndim > 2 else 1
    if rep > 1:
        k = cp.repeat(k, rep, axis=-3)
        v = cp.repeat(v, rep, axis=-3)
    s = cp.matmul(q, cp.swapaxes(k, -1, -2)) * scale
    if plain_dtype is not None:
        s = round_to(cp, s, plain_dtype)
    mask = visible(cp, q.shape[-2], k.shape[-2], causal)
    s = cp.where(mask, s, -cp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = cp.where(cp.isfinite(m), m, 0)
    p = cp.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    lse = cp.where(l[..., 0] > 0, cp.log(cp.where(l > 0, l, 1))[..., 0] + m[..., 0], -cp.inf)
    p = p / cp.where(l > 0, l, 1)
    if plain_dtype is not None:
        p = round_to(cp, p, plain_dtype)
    out = cp.matmul(p, v)
    if plain_dtype is not None:
        out = round_to(cp, out, plain_dtype)
    return out, lse


def max_err(cp, a, b):
    d = cp.abs(a.astype(cp.float64) - b.astype(cp.float64))
    both_ninf = cp.isneginf(a) & cp.isneginf(b)
    d = cp.where(both_ninf, 0, d)
    return float(d.max()) if d.size else 0.0


def check_forward(cp, q, k, v, name, causal, out=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, out=out)
    o32 = to_f32(cp, o)
    assert not bool(cp.isnan(o32).any()), "NaN (or an unwritten element) in out"
    assert not bool(cp.isnan(lse).any()), "NaN (or an unwritten element) in lse"
    q32, k32, v32 = (to_f32(cp, x) for x in (q, k, v))
    ref_o, ref_lse = reference(cp, q32, k32, v32, causal, scale)
    pl_o, pl_lse = reference(cp, q32, k32, v32, causal, scale, plain_dtype=name)
    err_o, tol_o = max_err(cp, o32, ref_o), 2 * max_err(cp, pl_o, ref_o) + 1e-5
    err_l, tol_l = max_err(cp, lse, ref_lse), 2 * max_err(cp, pl_lse, ref_lse) + 1e-5
    assert err_o <= tol_o, f"out error {err_o:.3g} > {tol_o:.3g}"
    assert err_l <= tol_l, f"lse error {err_l:.3g} > {tol_l:.3g}"
    # rows that see no key: out exactly 0 and lse -inf
    empty = ~visible(cp, q.shape[-2], k.shape[-2], causal).any(axis=1)
    if bool(empty.any()):
        assert bool((o32[..., empty, :] == 0).all())
        assert bool(cp.isneginf(lse[..., empty]).all())
    return o


@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("name", DTYPES)
def test_forward_grid(cp, name, causal, head_dim, seqlens):
    rng = np.random.default_rng()
    Lq, Lk = seqlens
    B, H = 1, 2
    q, k, v = random_qkv(cp, (B, H, Lq, head_dim), (B, H, Lk, head_dim), (B, H, Lk, head_dim),
                         name, rng)
    check_forward(cp, q, k, v, name, causal)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_forward_strided_bshd(cp, name, causal):
    """A flash-attn (B, L, H, D) buffer passed as a transposed view, output into one too."""
    rng = np.random.default_rng()
    B, L, H, D = 2, 300, 4, 64
    q, k, v = random_qkv(cp, (B, L, H, D), (B, L + 17, H, D), (B, L + 17, H, D), name, rng)
    out_buf = cp.empty((B, L, H, D), dtype=q.dtype)
    out = out_buf.transpose(0, 2, 1, 3)
    o = check_forward(cp, q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                      v.transpose(0, 2, 1, 3), name, causal, out=out)
    assert o.data.ptr == out_buf.data.ptr


@pytest.mark.parametrize("head_dim", (33, 72, 100))
def test_forward_unaligned(cp, head_dim):
    """Head dims that are not multiples of 8 take the element-wise load path."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 3, 77, head_dim), (2, 3, 131, head_dim), (2, 3, 131, head_dim),
                         "float16", rng)
    check_forward(cp, q, k, v, "float16", True)


def test_forward_gqa_and_batch_dims(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 3, 8, 97, 64), (2, 3, 2, 150, 64), (2, 3, 2, 150, 64),
                         "bfloat16", rng)
    check_forward(cp, q, k, v, "bfloat16", False)


def test_forward_unmergeable_batch(cp):
    """Leading dims whose strides cannot merge are walked index by index."""
    rng = np.random.default_rng()
    base = random_qkv(cp, (3, 4, 2, 65, 32), (3, 4, 2, 65, 32), (3, 4, 2, 65, 32), "float16",
                      rng)
    q, k, v = (x[:, ::2] for x in base)
    check_forward(cp, q, k, v, "float16", True)


def test_forward_2d_and_empty(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (70, 64), (90, 64), (90, 64), "float16", rng)
    check_forward(cp, q, k, v, "float16", True)
    q0, k0, v0 = random_qkv(cp, (1, 2, 0, 64), (1, 2, 5, 64), (1, 2, 5, 64), "float16", rng)
    assert cuflash.attention(q0, k0, v0).shape == (1, 2, 0, 64)
    # no keys at all: zeros and -inf
    q1, k1, v1 = random_qkv(cp, (1, 2, 5, 64), (1, 2, 0, 64), (1, 2, 0, 64), "float16", rng)
    o, lse = cuflash.attention(q1, k1, v1, return_lse=True)
    assert bool((o.astype(cp.float32) == 0).all()) and bool(cp.isneginf(lse).all())


def test_forward_fully_masked_rows(cp):
    """Lq > Lk with causal: the first Lq - Lk rows see no key."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 300, 128), (1, 2, 40, 128), (1, 2, 40, 128), "bfloat16", rng)
    check_forward(cp, q, k, v, "bfloat16", True)


def test_forward_matches_numpy_path(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (1, 2, 129, 80), (1, 2, 131, 80), (1, 2, 131, 80), "float16", rng)
    o_gpu, lse_gpu = cuflash.attention(q, k, v, causal=True, return_lse=True)
    o_cpu, lse_cpu = cuflash.attention(q.get(), k.get(), v.get(), causal=True, return_lse=True)
    np.testing.assert_allclose(o_gpu.get().astype(np.float32), o_cpu.astype(np.float32),
                               atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(lse_gpu.get(), lse_cpu, atol=1e-3, rtol=1e-4)


def test_forward_deterministic_across_runs(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 4, 333, 128), (2, 4, 333, 128), (2, 4, 333, 128), "float16", rng)
    first = cuflash.attention(q, k, v, causal=True)
    for _ in range(3):
        again = cuflash.attention(q, k, v, causal=True)
        assert bool((again.view(cp.uint16) == first.view(cp.uint16)).all())
