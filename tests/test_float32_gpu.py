"""GPU tests of float32 inputs (marked ``gpu``): the kernels keep q, k, v, out and the
gradients in float32 and run the products on tensor cores with operands rounded to tf32
(10 explicit mantissa bits, float32's range), accumulating in float32.

Tolerance rule as for fp16/bf16: against the float64 reference, at most twice the error of
a plain tf32 implementation (``gpu_util.reference`` with ``plain_dtype="float32"``: every
product rounds its operands to tf32, nothing else is rounded), plus 1e-5. Outputs are
poisoned (NaN) before each call.
"""

import numpy as np
import pytest

import cuflash
from gpu_util import GRADS, check_grads, random_array, random_qkv, to_f32
from gpu_util import cp, poison_allocator  # noqa: F401
from test_options_gpu import OPTION_SETS, check_case, check_forward

pytestmark = pytest.mark.gpu

HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 192, 256)
SEQLENS = ((1, 1), (1, 239), (113, 203), (239, 1), (512, 256), (1023, 1024))


@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_float32_grid(cp, causal, head_dim, seqlens):
    """Forward and backward (atomic dQ), GQA 4:2."""
    Lq, Lk = seqlens
    B = max(2, 32 // Lq)
    check_case(cp, "float32", (B, 4, Lq, head_dim), (B, 2, Lk, head_dim), causal, {},
               np.random.default_rng())


@pytest.mark.parametrize("seqlens", ((113, 203), (1023, 1024)), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("head_dim", (64, 96, 128, 256))
@pytest.mark.parametrize("option_set", ("none",) + tuple(OPTION_SETS))
def test_float32_options_and_deterministic(cp, option_set, head_dim, seqlens):
    causal, opts = (False, {}) if option_set == "none" else OPTION_SETS[option_set]
    Lq, Lk = seqlens
    for det in (False, True):
        check_case(cp, "float32", (2, 4, Lq, head_dim), (2, 2, Lk, head_dim), causal, opts,
                   np.random.default_rng(), deterministic=det)


def test_float32_deterministic_bitwise_and_dv_ne_d(cp):
    rng = np.random.default_rng()
    q, k, v = random_qkv(cp, (2, 4, 333, 192), (2, 1, 400, 192), (2, 1, 400, 128), "float32",
                         rng)
    o, lse = check_forward(cp, q, k, v, "float32", True, {})
    dout = random_array(cp, o.shape, "float32", rng)
    first = cuflash.attention_backward(dout, q, k, v, o, lse, causal=True, deterministic=True)
    again = cuflash.attention_backward(dout, q, k, v, o, lse, causal=True, deterministic=True)
    for label, a, b in zip(GRADS, first, again):
        assert a.dtype == cp.float32
        assert bool((a.view(cp.uint32) == b.view(cp.uint32)).all()), label


def test_float32_strided_and_unaligned(cp):
    """(B, L, H, D) views; D = 36 (not a whole 16-byte chunk of float32s: scalar copies)."""
    rng = np.random.default_rng()
    for D in (36, 72):
        q, k, v = random_qkv(cp, (2, 150, 4, D), (2, 170, 2, D), (2, 170, 2, D), "float32",
                             rng)
        tr = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        o, lse = check_forward(cp, tr(q), tr(k), tr(v), "float32", False, {"softcap": 2.0})
        dout = random_array(cp, o.shape, "float32", rng)
        grads = cuflash.attention_backward(dout, tr(q), tr(k), tr(v), o, lse, softcap=2.0)
        check_grads(cp, grads, tr(q), tr(k), tr(v), dout, o, "float32", False, softcap=2.0)


def test_float32_varlen_and_numpy_path(cp):
    rng = np.random.default_rng()
    lens = [0, 1, 200, 3]
    cu = cp.asarray(np.cumsum([0] + lens), cp.int32)
    q, k, v = random_qkv(cp, (sum(lens), 4, 64), (sum(lens), 2, 64), (sum(lens), 2, 64),
                         "float32", rng)
    out = cuflash.attention_varlen(q, k, v, cu, cu, 200, 200, causal=True)
    ref = cuflash.attention_varlen(q.get(), k.get(), v.get(), cu.get(), cu.get(), 200, 200,
                                   causal=True)
    assert out.dtype == cp.float32 and ref.dtype == np.float32
    np.testing.assert_allclose(out.get(), ref, atol=5e-3)
    one = cuflash.attention(q[1:201].swapaxes(0, 1)[None], k[1:201].swapaxes(0, 1)[None],
                            v[1:201].swapaxes(0, 1)[None], causal=True)
    assert bool((one[0].swapaxes(0, 1) == out[1:201]).all())
    assert to_f32(cp, out).dtype == cp.float32
