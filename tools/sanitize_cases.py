"""Small forward and backward cases for compute-sanitizer (memcheck / racecheck): odd
sizes, every masking regime, the aligned and the element-wise load paths, GQA, both
backward modes.

    python3 tools/sanitize_cases.py [--small]   (--small: a few cases, for racecheck)
"""

import sys

import cupy as cp

import cuflash
from cuflash import _bench

rs = cp.random.RandomState(0)
cases = [((1, 2, 113, 64), (1, 2, 203, 64), True), ((1, 1, 1, 40), (1, 1, 239, 40), False),
         ((2, 2, 239, 128), (2, 2, 1, 128), True), ((1, 2, 130, 256), (1, 2, 77, 256), True),
         ((1, 2, 65, 33), (1, 2, 90, 33), True), ((1, 2, 64, 96), (1, 2, 64, 96), False),
         ((1, 4, 100, 160), (1, 2, 150, 160), True)]
if "--small" in sys.argv:
    cases = [cases[0], cases[2], cases[4]]
for dtype in ("float16", "bfloat16"):
    for sq, sk, causal in cases:
        q = _bench.random_array(sq, dtype, rs)
        k = _bench.random_array(sk, dtype, rs)
        v = _bench.random_array(sk, dtype, rs)
        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
        dout = _bench.random_array(out.shape, dtype, rs)
        for deterministic in (False, True):
            cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                       deterministic=deterministic)
cp.cuda.runtime.deviceSynchronize()
print("sanitizer cases done")
