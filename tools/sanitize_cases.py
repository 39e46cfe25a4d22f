"""Small forward cases for compute-sanitizer (memcheck / racecheck): odd sizes, every
masking regime, the aligned and the element-wise load paths."""

import cupy as cp

import cuflash
from cuflash import _bench

rs = cp.random.RandomState(0)
cases = [((1, 2, 113, 64), (1, 2, 203, 64), True), ((1, 1, 1, 40), (1, 1, 239, 40), False),
         ((2, 2, 239, 128), (2, 2, 1, 128), True), ((1, 2, 130, 256), (1, 2, 77, 256), True),
         ((1, 2, 65, 33), (1, 2, 90, 33), True), ((1, 2, 64, 96), (1, 2, 64, 96), False)]
for dtype in ("float16", "bfloat16"):
    for sq, sk, causal in cases:
        q = _bench.random_array(sq, dtype, rs)
        k = _bench.random_array(sk, dtype, rs)
        v = _bench.random_array(sk, dtype, rs)
        cuflash.attention(q, k, v, causal=causal, return_lse=True)
cp.cuda.runtime.deviceSynchronize()
print("sanitizer cases done")
