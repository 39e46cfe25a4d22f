"""Small forward and backward cases for compute-sanitizer (memcheck / racecheck): odd
sizes, every masking regime, the aligned and the element-wise load paths, GQA, both
backward modes, the options kernels (window, softcap, ALiBi, dropout), packed sequences,
float32 (tf32) and the dropout-mask kernels. On sm_90 devices the forward cases run on
both kernel families (the Hopper kernels, where they cover a call, and the portable ones).

    python3 tools/sanitize_cases.py [--small | --hopper] [--few-blocks]
    (--small: a few cases, for racecheck; --hopper: the sm_90a kernels only: plain, GQA
     split over blocks, the options, dropout, packed sequences, the wide backward (d192,
     d256); --few-blocks: the
     persistent sm_90a forward with two blocks, each walking many tiles)
"""

import sys

import cupy as cp
import numpy as np

import cuflash
from cuflash import _bench, _sm90

rs = cp.random.RandomState(0)
slopes = cp.asarray([0.5, 0.25, 0.125, 0.0625], dtype=cp.float32)
options = {"window": (40, 7), "softcap": 2.0}
# (q shape, k shape, causal, options)
cases = [((1, 2, 113, 64), (1, 2, 203, 64), True, {}), ((1, 1, 1, 40), (1, 1, 239, 40), False, {}),
         ((2, 2, 239, 128), (2, 2, 1, 128), True, {}), ((1, 2, 130, 256), (1, 2, 77, 256), True, {}),
         ((1, 2, 65, 33), (1, 2, 90, 33), True, {}), ((1, 2, 64, 96), (1, 2, 64, 96), False, {}),
         ((1, 4, 100, 160), (1, 2, 150, 160), True, {}),
         ((1, 4, 300, 128), (1, 2, 260, 128), False, dict(options, alibi_slopes=slopes)),
         ((1, 4, 97, 64), (1, 1, 333, 64), True, dict(options, alibi_slopes=slopes)),
         ((1, 2, 150, 72), (1, 2, 150, 72), False, {"window": (0, 0)}),
         ((2, 4, 140, 128), (2, 2, 170, 128), True, {"dropout_p": 0.3, "seed": 5}),
         ((1, 2, 77, 64), (1, 2, 99, 64), False, dict(options, dropout_p=0.1, seed=2)),
         ((1, 2, 700, 128), (1, 2, 900, 128), True, {}), ((1, 2, 333, 192), (1, 2, 555, 192), False, {})]
if "--hopper" in sys.argv:
    cases = [((1, 4, 300, 128), (1, 2, 500, 128), True, {}), ((2, 2, 130, 64), (2, 2, 77, 64), False, {}),
             ((1, 4, 300, 128), (1, 2, 260, 128), False, dict(options, alibi_slopes=slopes)),
             ((1, 2, 77, 64), (1, 2, 99, 64), True, dict(options, dropout_p=0.1, seed=2)),
             # the wide backward: GQA split over blocks; 192 (a column block past the rows)
             ((1, 4, 130, 256), (1, 2, 200, 256), True, {}),
             ((1, 2, 77, 192), (1, 2, 99, 192), False, dict(options, dropout_p=0.1, seed=2))]
if "--small" in sys.argv:
    cases = [cases[0], cases[2], cases[4], cases[7], cases[10], cases[12]]
HOPPER_ONLY = "--hopper" in sys.argv
if "--few-blocks" in sys.argv:
    _sm90.FWD_MAX_BLOCKS = 2
for dtype in ("float16", "bfloat16") if HOPPER_ONLY else ("float16", "bfloat16", "float32"):
    for sq, sk, causal, opts in cases:
        q = _bench.random_array(sq, dtype, rs)
        k = _bench.random_array(sk, dtype, rs)
        v = _bench.random_array(sk, dtype, rs)
        for hopper in (True,) if HOPPER_ONLY else (False, True):  # (twice without sm_90)
            _sm90.enabled = hopper
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **opts)
        dout = _bench.random_array(out.shape, dtype, rs)
        for deterministic in (False, True):
            cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                       deterministic=deterministic, **opts)
# packed sequences, with a 0- and a 1-row one
lengths = [0, 1, 130, 77]
cu = cp.asarray([0] + list(np.cumsum(lengths)), dtype=cp.int32)
for dtype in ("float16", "bfloat16") if HOPPER_ONLY else ("float16", "bfloat16", "float32"):
    q = _bench.random_array((int(cu[-1]), 4, 64), dtype, rs)
    k = _bench.random_array((int(cu[-1]), 2, 64), dtype, rs)
    v = _bench.random_array((int(cu[-1]), 2, 64), dtype, rs)
    out, lse = cuflash.attention_varlen(q, k, v, cu, cu, 130, 130, causal=True,
                                        return_lse=True, softcap=2.0)
    dout = _bench.random_array(out.shape, dtype, rs)
    for deterministic in (False, True):
        cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, 130, 130,
                                          causal=True, deterministic=deterministic, softcap=2.0)
if HOPPER_ONLY:
    cp.cuda.runtime.deviceSynchronize()
    print("sanitizer cases done")
    sys.exit(0)
x = cp.empty((2, 3, 113, 8), cp.float16)
for transposed in (False, True):
    cuflash.dropout_mask(x, x[:, :, :50], dropout_p=0.2, seed=1, transposed=transposed)
cp.cuda.runtime.deviceSynchronize()
print("sanitizer cases done")
