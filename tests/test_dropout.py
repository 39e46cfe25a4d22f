"""CPU tests of dropout (cuflash._dropout and the API's NumPy path): Philox against the
published known-answer vectors, the mask as a pure function with the right keep rate, the
float64 reference with a mask against finite differences, the argument checks, and the
NumPy path of cuflash.attention / attention_backward / attention_varlen with dropout."""

import numpy as np
import pytest

import cuflash
from cuflash import _dropout, _reference


_PI_COUNTER, _PI_KEY = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)


@pytest.mark.parametrize("rounds, counter, key, expect", [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, _PI_COUNTER, _PI_KEY, (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, _PI_COUNTER, _PI_KEY, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(rounds, counter, key, expect):
    """Philox4x32-7 and -10's known-answer vectors (Random123); the mask uses 7 rounds."""
    assert tuple(int(x) for x in _dropout.philox4x32(counter, key, rounds)) == expect
    if rounds == _dropout.PHILOX_ROUNDS:
        assert tuple(int(x) for x in _dropout.philox4x32(counter, key)) == expect


def test_keep_rate_and_slots():
    p = 0.3
    m = _dropout.keep_mask(2024, p, 2, 4, 256, 512)
    n = m.size
    assert abs(m.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    # each of the eight 16-bit words of a Philox call keeps at the same rate
    i = np.arange(256)[:, None]
    j = np.arange(512)[None, :]
    slot = 4 * ((i >> 3) & 1) + 2 * ((j >> 3) & 1) + (j & 1)
    for s in range(8):
        sel = m[..., np.broadcast_to(slot == s, (256, 512))]
        assert abs(sel.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / sel.size)


def test_mask_is_a_pure_function_of_its_coordinates():
    a = _dropout.keep_mask(7, 0.5, 3, 2, 70, 90)
    b = _dropout.keep_mask(7, 0.5, 2, 2, 40, 50)  # fewer batches, rows, columns
    np.testing.assert_array_equal(a[:2, :, :40, :50], b)
    assert np.array_equal(a, _dropout.keep_mask(7, 0.5, 3, 2, 70, 90))
    assert not np.array_equal(a, _dropout.keep_mask(8, 0.5, 3, 2, 70, 90))
    assert _dropout.keep_mask(7, 0.0, 1, 1, 16, 16).all()
    big = _dropout.keep_mask(2**64 - 1, 0.5, 1, 1, 16, 16)  # the whole seed range
    assert 0 < big.mean() < 1


@pytest.mark.parametrize("bad", (-0.1, 1.0, 1.5))
def test_threshold_checks_p(bad):
    with pytest.raises(ValueError, match="dropout_p"):
        _dropout.threshold(bad)


@pytest.mark.parametrize("causal", (False, True))
def test_reference_with_mask_matches_finite_differences(causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 5, 4), (1, 1, 7, 4), (1, 1, 7, 3)))
    dout = rng.standard_normal((1, 2, 5, 3))
    p = 0.4
    mask = _dropout.keep_mask(99, p, 1, 2, 5, 7)
    kw = dict(causal=causal, dropout_p=p, dropout_mask=mask)
    grads = _reference.attention_backward_naive(dout, q, k, v, **kw)

    def loss(q, k, v):
        return float(np.sum(dout * _reference.attention_naive(q, k, v, **kw)[0]))

    eps = 1e-6
    for x, g in zip((q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            x[idx] += eps
            up = loss(q, k, v)
            x[idx] -= 2 * eps
            down = loss(q, k, v)
            x[idx] += eps
            num[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, num, atol=1e-7, rtol=1e-6)


def test_reference_mask_semantics():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 6, 8)) for _ in range(3))
    plain, lse = _reference.attention_naive(q, k, v)
    ones = np.ones((2, 6, 6), bool)
    same, lse2 = _reference.attention_naive(q, k, v, dropout_p=0.0, dropout_mask=ones)
    np.testing.assert_allclose(same, plain)
    np.testing.assert_allclose(lse2, lse)
    mask = _dropout.keep_mask(5, 0.5, 1, 2, 6, 6)[0]
    dropped, lse3 = _reference.attention_naive(q, k, v, dropout_p=0.5, dropout_mask=mask)
    np.testing.assert_allclose(lse3, lse)  # lse is taken before dropout
    p = np.exp(q @ np.swapaxes(k, -1, -2) / np.sqrt(8) - lse[..., None])
    np.testing.assert_allclose(dropped, (p * mask * 2.0) @ v)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"dropout_p": 0.1}, ValueError, "seed is required"),
    ({"dropout_p": -0.1, "seed": 1}, ValueError, "dropout_p must be in"),
    ({"dropout_p": 1.0, "seed": 1}, ValueError, "dropout_p must be in"),
    ({"dropout_p": "0.1", "seed": 1}, TypeError, "dropout_p must be a real"),
    ({"dropout_p": True, "seed": 1}, TypeError, "dropout_p must be a real"),
    ({"dropout_p": 0.1, "seed": 1.5}, TypeError, "seed must be an int"),
    ({"dropout_p": 0.1, "seed": -1}, ValueError, "seed must be in"),
    ({"dropout_p": 0.1, "seed": 2**64}, ValueError, "seed must be in"),
])
def test_dropout_arguments_are_checked(kwargs, err, match):
    q = np.zeros((2, 16, 8), np.float16)
    with pytest.raises(err, match=match):
        cuflash.attention(q, q, q, **kwargs)
    with pytest.raises(err, match=match):
        cuflash.dropout_mask(q, q, **{"seed": None, **kwargs})


def test_numpy_path_applies_the_mask():
    """cuflash.attention on NumPy arrays with dropout equals the float64 reference given
    the mask of cuflash.dropout_mask; p = 0 or no seed-dependence where nothing drops."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float16)
               for s in ((2, 4, 37, 16), (2, 2, 41, 16), (2, 2, 41, 8)))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, dropout_p=0.3, seed=9)
    mask = cuflash.dropout_mask(q, k, dropout_p=0.3, seed=9)
    assert mask.shape == (2, 4, 37, 41)
    ref, ref_lse = _reference.attention_naive(q, k, v, causal=True, dropout_p=0.3,
                                              dropout_mask=mask)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=2e-3)
    plain, plain_lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_allclose(lse, plain_lse, atol=1e-6)  # lse before dropout
    same = cuflash.attention(q, k, v, causal=True, dropout_p=0.0, seed=123)
    np.testing.assert_array_equal(same, plain)
    dout = rng.standard_normal(out.shape).astype(np.float16)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, dropout_p=0.3,
                                       seed=9)
    ref_grads = _reference.attention_backward_naive(dout, q, k, v, causal=True, dropout_p=0.3,
                                                    dropout_mask=mask)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.astype(np.float64), r, atol=3e-3)


def test_numpy_varlen_uses_each_sequence_corner():
    rng = np.random.default_rng(2)
    lens = [3, 0, 20]
    cu = np.cumsum([0] + lens).astype(np.int32)
    q, k, v = (rng.standard_normal((23, 2, 8)).astype(np.float16) for _ in range(3))
    out = cuflash.attention_varlen(q, k, v, cu, cu, 20, 20, dropout_p=0.5, seed=4)
    mask = _dropout.keep_mask(4, 0.5, 3, 2, 20, 20)
    for b, (start, n) in enumerate(zip(cu[:-1], lens)):
        if n == 0:
            continue
        sl = slice(start, start + n)
        ref, _ = _reference.attention_naive(*(x[sl].swapaxes(0, 1) for x in (q, k, v)),
                                            dropout_p=0.5, dropout_mask=mask[b, :, :n, :n])
        np.testing.assert_allclose(out[sl].swapaxes(0, 1).astype(np.float64), ref, atol=2e-3)
