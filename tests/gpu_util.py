"""Helpers and fixtures shared by the GPU test modules (``test_*_gpu.py``).

Imports no CuPy at module level, so the CPU test run can collect it. A GPU test module
takes the fixtures with ``from gpu_util import cp, poison_allocator  # noqa: F401``;
the poisoning is autouse, so it then applies to every test of that module (and only
of the modules that import it).
"""

import contextlib
import math

import numpy as np
import pytest

DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 192, 256)
SEQLENS = ((1, 1), (1, 239), (113, 203), (128, 217), (239, 1), (512, 256), (1023, 1024),
           (1024, 1023), (2048, 2048))
GRADS = ("dq", "dk", "dv")


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
    # Give the test's cached blocks back now: a pool that waits for the garbage collector
    # keeps them, and over a whole suite in one process the device runs out (a run of
    # test_options_gpu then test_varlen_gpu did, at efe64ba).
    pool.free_all_blocks()


def _dtype(name):
    import ml_dtypes

    if name == "float32":
        return np.dtype(np.float32)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float16)


def round_tf32(cp, x32):
    """float32 -> nearest tf32 value (10 explicit mantissa bits, ties away from zero, as
    the kernels' cvt.rna), as float32."""
    u = x32.astype(cp.float32).view(cp.uint32)
    return ((u + cp.uint32(0x1000)) & cp.uint32(0xFFFFE000)).view(cp.float32)


def round_to(cp, x32, name):
    """float32 -> nearest fp16/bf16 value, returned as float32; float32 stays as it is
    (its products round their operands to tf32 instead: see reference)."""
    if name == "float32":
        return x32
    if name == "float16":
        return x32.astype(cp.float16).astype(cp.float32)
    u = x32.view(cp.uint32)
    u = (u + (cp.uint32(0x7FFF) + ((u >> 16) & 1))) & cp.uint32(0xFFFF0000)
    return u.view(cp.float32)


def to_dtype(cp, x32, name):
    """float32 array -> fp16/bf16 array (bf16 through its bit pattern), or float32."""
    if name == "float32":
        return x32.astype(cp.float32)
    if name == "float16":
        return x32.astype(cp.float16)
    bits = (round_to(cp, x32, name).view(cp.uint32) >> 16).astype(cp.uint16)
    return bits.view(_dtype(name))


def to_f32(cp, x):
    if x.dtype == np.float32:
        return x
    if x.dtype == np.float16:
        return x.astype(cp.float32)
    return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)


def random_array(cp, shape, name, rng):
    """Standard normal values in fp16/bf16 (or float32)."""
    return to_dtype(cp, cp.asarray(rng.standard_normal(shape, dtype=np.float32)), name)


def random_qkv(cp, shape_q, shape_k, shape_v, name, rng):
    return [random_array(cp, shape, name, rng) for shape in (shape_q, shape_k, shape_v)]


def visible(cp, Lq, Lk, causal, window=None):
    """Which keys each query sees: causal and/or window (left, right), -1 unbounded."""
    i = cp.arange(Lq)[:, None]
    j = cp.arange(Lk)[None, :]
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    seen = cp.ones((Lq, Lk), dtype=bool)
    if right >= 0:
        seen &= j <= i + Lk - Lq + right
    if left >= 0:
        seen &= j >= i + Lk - Lq - left
    return seen


def scores(cp, q, k, causal, scale, rnd, window=None, softcap=0.0, alibi_slopes=None):
    """Masked scores ``s`` and the softcap's ``ds/d(scale q k^T)`` (None without one);
    ``rnd`` rounds where a plain same-precision implementation would."""
    s = rnd(cp.matmul(q, cp.swapaxes(k, -1, -2)) * scale)
    jac = None
    if softcap:
        t = cp.tanh(s / softcap)
        s, jac = rnd(softcap * t), 1 - t * t
    if alibi_slopes is not None:
        Lq, Lk = q.shape[-2], k.shape[-2]
        dist = cp.abs(cp.arange(Lq)[:, None] + Lk - Lq - cp.arange(Lk)[None, :]).astype(s.dtype)
        slopes = alibi_slopes.astype(s.dtype).reshape(alibi_slopes.shape + (1, 1))
        s = rnd(s - slopes * dist)
    s = cp.where(visible(cp, q.shape[-2], k.shape[-2], causal, window), s, -cp.inf)
    return s, jac


def _pop_dropout(cp, opts):
    """(opts without the dropout entries, Z / (1 - p) as an array, or None)."""
    opts = dict(opts)
    mask, p = opts.pop("dropout_mask", None), opts.pop("dropout_p", 0.0)
    return opts, None if mask is None else cp.asarray(mask) / (1.0 - p)


def reference(cp, q, k, v, causal, scale, plain_dtype=None, **opts):
    """float64 attention (plain_dtype None), or the plain same-precision version;
    opts: window, softcap, alibi_slopes, dropout_p with dropout_mask (bool, broadcasting to
    the scores). A plain float32 version is a tf32 one: every product rounds its operands
    to tf32 (as cuBLAS's TF32 mode does), and nothing else is rounded."""
    opts, zr = _pop_dropout(cp, opts)
    f = (lambda x: x.astype(cp.float64)) if plain_dtype is None else (lambda x: x)
    rnd = (lambda x: round_to(cp, x, plain_dtype)) if plain_dtype else (lambda x: x)
    op = _operand_rounding(cp, plain_dtype)
    q, k, v = op(f(q)), op(f(k)), op(f(v))
    rep = q.shape[-3] // k.shape[-3] if q.ndim > 2 else 1
    if rep > 1:
        k = cp.repeat(k, rep, axis=-3)
        v = cp.repeat(v, rep, axis=-3)
    s, _ = scores(cp, q, k, causal, scale, rnd, **opts)
    m = s.max(axis=-1, keepdims=True)
    m = cp.where(cp.isfinite(m), m, 0)
    p = cp.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    lse = cp.where(l[..., 0] > 0, cp.log(cp.where(l > 0, l, 1))[..., 0] + m[..., 0], -cp.inf)
    p = p / cp.where(l > 0, l, 1)
    if plain_dtype is not None:
        p = round_to(cp, p, plain_dtype)
    if zr is not None:
        p = p * zr.astype(p.dtype)
        if plain_dtype is not None:
            p = round_to(cp, p, plain_dtype)
    out = cp.matmul(op(p), v)
    if plain_dtype is not None:
        out = round_to(cp, out, plain_dtype)
    return out, lse


def _operand_rounding(cp, plain_dtype):
    """What a plain implementation does to a product's operands: tf32 for float32."""
    return (lambda x: round_tf32(cp, x)) if plain_dtype == "float32" else (lambda x: x)


def reference_backward(cp, q, k, v, dout, causal, scale, plain_dtype=None, out=None, **opts):
    """Closed-form gradients ``(dq, dk, dv)`` of attention.

    plain_dtype None: float64 throughout. Otherwise the plain same-precision version:
    float32 arithmetic with S, P, dP, dS and the gradients rounded to ``plain_dtype``
    where a plain fp16/bf16 implementation rounds them, and ``delta = rowsum(dout * out)``
    from the given forward output ``out`` (float32 array). Inputs are float32 arrays
    holding fp16/bf16 values. GQA: k, v repeated over the group of query heads, dk, dv
    summed over it. A query row that sees no key contributes zero (no NaN).
    """
    opts, zr = _pop_dropout(cp, opts)
    plain = plain_dtype is not None
    f = (lambda x: x) if plain else (lambda x: x.astype(cp.float64))
    rnd = (lambda x: round_to(cp, x, plain_dtype)) if plain else (lambda x: x)
    op = _operand_rounding(cp, plain_dtype)
    q, k, v, dout = f(q), f(k), f(v), f(dout)
    dout_raw, (q, k, v, dout) = dout, (op(x) for x in (q, k, v, dout))
    rep = q.shape[-3] // k.shape[-3] if q.ndim > 2 else 1
    if rep > 1:
        k = cp.repeat(k, rep, axis=-3)
        v = cp.repeat(v, rep, axis=-3)
    t = lambda x: cp.swapaxes(x, -1, -2)  # noqa: E731
    s, jac = scores(cp, q, k, causal, scale, rnd, **opts)
    m = s.max(axis=-1, keepdims=True)
    p = cp.exp(s - cp.where(cp.isfinite(m), m, 0))
    l = p.sum(axis=-1, keepdims=True)
    p = rnd(p / cp.where(l > 0, l, 1))
    pz = p if zr is None else rnd(p * zr.astype(p.dtype))  # dropout: P Z / (1 - p)
    o = out if plain else cp.matmul(pz, v)
    dv = rnd(cp.matmul(t(op(pz)), dout))
    dp = rnd(cp.matmul(dout, t(v)))
    delta = (dout_raw * o).sum(axis=-1, keepdims=True)
    ds = rnd(p * (dp - delta)) if zr is None else rnd(pz * dp - p * delta)
    if jac is not None:
        ds = rnd(ds * jac)
    dq = rnd(cp.matmul(op(ds), k) * scale)
    dk = rnd(cp.matmul(t(op(ds)), q) * scale)
    if rep > 1:
        def group_sum(x):
            x = x.reshape(x.shape[:-3] + (x.shape[-3] // rep, rep) + x.shape[-2:])
            return rnd(x.sum(axis=-3))

        dk, dv = group_sum(dk), group_sum(dv)
    return dq, dk, dv


def max_err(cp, a, b):
    d = cp.abs(a.astype(cp.float64) - b.astype(cp.float64))
    both_ninf = cp.isneginf(a) & cp.isneginf(b)
    d = cp.where(both_ninf, 0, d)
    return float(d.max()) if d.size else 0.0


def check_grads(cp, grads, q, k, v, dout, out, name, causal, scale=None, ruled=GRADS, **opts):
    """Shapes, dtypes, no NaN, the tolerance rule (for the gradients named in ``ruled``),
    and dq = 0 on rows that see no key; opts: window, softcap, alibi_slopes."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    for label, g, x in zip(GRADS, grads, (q, k, v)):
        assert g.shape == x.shape, f"{label}.shape {g.shape} != {x.shape}"
        assert g.dtype == x.dtype, f"{label}.dtype {g.dtype} != {x.dtype}"
    g32 = [to_f32(cp, g) for g in grads]
    for label, g in zip(GRADS, g32):
        assert not bool(cp.isnan(g).any()), f"NaN (or an unwritten element) in {label}"
    q32, k32, v32, do32, o32 = (to_f32(cp, x) for x in (q, k, v, dout, out))
    ref = reference_backward(cp, q32, k32, v32, do32, causal, scale, **opts)
    plain = reference_backward(cp, q32, k32, v32, do32, causal, scale, plain_dtype=name,
                               out=o32, **opts)
    for label, g, r, p in zip(GRADS, g32, ref, plain):
        if label not in ruled:
            continue
        err, tol = max_err(cp, g, r), 2 * max_err(cp, p, r) + 1e-5
        assert err <= tol, f"{label} error {err:.3g} > {tol:.3g}"
    # query rows that see no key: dq exactly 0
    empty = ~visible(cp, q.shape[-2], k.shape[-2], causal, opts.get("window")).any(axis=1)
    if bool(empty.any()):
        assert bool((g32[0][..., empty, :] == 0).all())


KERNEL_PATHS = ("mma", "sm90")


@contextlib.contextmanager
def kernel_path(cp, path):
    """Run on one kernel family: "mma" (the portable mma.sync kernels) or "sm90" (the
    Hopper kernels, where they cover the call; skipped on other devices). Yields a list
    that collects the sm_90a launches ("fwd", spec) and ("bwd", spec), so a test can check
    that the Hopper kernels really ran."""
    from cuflash import _sm90

    if path == "sm90" and int(cp.cuda.Device().compute_capability) != 90:
        pytest.skip("the sm_90a kernels need an sm_90 device")
    launched = []
    saved = _sm90.enabled, _sm90.forward, _sm90.backward_main

    def spy(kind, fn):
        def run(spec, *args, **kwargs):
            launched.append((kind, spec))
            return fn(spec, *args, **kwargs)
        return run

    _sm90.enabled = path == "sm90"
    _sm90.forward, _sm90.backward_main = spy("fwd", saved[1]), spy("bwd", saved[2])
    try:
        yield launched
    finally:
        _sm90.enabled, _sm90.forward, _sm90.backward_main = saved

