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
from gpu_util import (DTYPES, HEAD_DIMS, KERNEL_PATHS, SEQLENS, kernel_path, max_err,
                      random_qkv, reference, to_f32, visible)
from gpu_util import cp, poison_allocator  # noqa: F401

pytestmark = pytest.mark.gpu


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
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_forward_grid(cp, path, name, causal, head_dim, seqlens):
    rng = np.random.default_rng()
    Lq, Lk = seqlens
    B, H = max(1, 16 // max(Lq, 1)), 2  # one-row cases: more rows (test_backward_gpu.py)
    q, k, v = random_qkv(cp, (B, H, Lq, head_dim), (B, H, Lk, head_dim), (B, H, Lk, head_dim),
                         name, rng)
    with kernel_path(cp, path) as launched:
        check_forward(cp, q, k, v, name, causal)
    if path == "sm90":  # the Hopper kernel covers head dims of whole 16-byte rows
        assert bool(launched) == (head_dim % 8 == 0)


@pytest.mark.parametrize("seqlens", [(4099, 4099), (3000, 5001)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", (64, 128, 256))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_forward_long_sequences(cp, causal, head_dim, seqlens):
    """Long sequences on the sm_90a kernels (the grid's lengths stay below 2k): tiles of
    30 to 40 key tiles, in persistent blocks."""
    rng = np.random.default_rng()
    Lq, Lk = seqlens
    q, k, v = random_qkv(cp, (1, 2, Lq, head_dim), (1, 2, Lk, head_dim), (1, 2, Lk, head_dim),
                         "bfloat16", rng)
    with kernel_path(cp, "sm90") as launched:
        check_forward(cp, q, k, v, "bfloat16", causal)
    assert [spec.persistent for _, spec in launched] == [True]


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_forward_gqa_strided_paths(cp, path, causal):
    """GQA 4:1 on (B, L, H, D) views, odd lengths, both kernel families; the out buffer is
    a view too."""
    rng = np.random.default_rng()
    for name, D, Lq, Lk in (("bfloat16", 128, 333, 1000), ("float16", 64, 1000, 77)):
        q, k, v = random_qkv(cp, (2, Lq, 8, D), (2, Lk, 2, D), (2, Lk, 2, D), name, rng)
        tr = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        out = cp.full((2, Lq, 8, D), np.nan, q.dtype).transpose(0, 2, 1, 3)
        with kernel_path(cp, path) as launched:
            check_forward(cp, tr(q), tr(k), tr(v), name, causal, out=out)
        assert bool(launched) == (path == "sm90")


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


def _bits(cp, x):
    return x.view(cp.uint16) if x.dtype != cp.float32 else x.view(cp.uint32)


@pytest.mark.parametrize("case", ["d64-causal", "d128-full", "d128-causal-window-softcap",
                                  "d256-causal-gqa", "d128-packed-causal", "d64-dropout"])
def test_forward_persistent_blocks_walk_many_tiles(cp, case, monkeypatch):
    """The sm_90a forward's persistent blocks: with three blocks, each walks many tiles
    (of every length, causal longest first, windows with and without keys, packed
    sequences past their end), and the results are those of the one-tile blocks' kernel,
    bit for bit, with every element written."""
    from cuflash import _sm90

    rng = np.random.default_rng()
    name = "bfloat16"
    d = int(case.split("-")[0][1:])
    causal = "causal" in case
    opts = {}
    if "window" in case:
        opts = {"window": (100, 0), "softcap": 5.0}
    if "dropout" in case:
        opts = {"dropout_p": 0.2, "seed": 7}
    hq, hk = (8, 2) if "gqa" in case else (4, 4)

    def run():
        if "packed" in case:
            lengths = [700, 1, 0, 260, 1023]
            cu = cp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            q, k, v = qkv
            return cuflash.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths),
                                            causal=causal, return_lse=True, **opts)
        return cuflash.attention(*qkv, causal=causal, return_lse=True, **opts)

    if "packed" in case:
        total = 700 + 1 + 0 + 260 + 1023
        qkv = random_qkv(cp, (total, hq, d), (total, hk, d), (total, hk, d), name, rng)
    else:
        qkv = random_qkv(cp, (2, hq, 777, d), (2, hk, 900, d), (2, hk, 900, d), name, rng)
    with kernel_path(cp, "sm90") as launched:
        monkeypatch.setattr(_sm90, "FWD_MAX_BLOCKS", 3)
        out, lse = run()
        cp.cuda.get_current_stream().synchronize()
        monkeypatch.setattr(_sm90, "FWD_PERSISTENT", False)
        ref_out, ref_lse = run()
    assert [(kind, spec.persistent) for kind, spec in launched] == [("fwd", True),
                                                                    ("fwd", False)]
    assert not bool(cp.isnan(to_f32(cp, out)).any()), "NaN (or an unwritten element) in out"
    assert not bool(cp.isnan(lse).any()), "NaN (or an unwritten element) in lse"
    assert bool((_bits(cp, out) == _bits(cp, ref_out)).all())
    assert bool((_bits(cp, lse) == _bits(cp, ref_lse)).all())
