"""Plain forward TFLOP/s, d256 and d128 (bf16, L 4k and 16k), for the tree on PYTHONPATH:

    PYTHONPATH=TREE python3 tools/ab_forward.py TAG

For same-call A/B runs of two trees (docs/results/fwd-ab-*.txt)."""
import sys
import cuflash
from cuflash import _bench
cp = _bench._cupy()
tag = sys.argv[1]
for d, h in ((256, 8), (128, 16)):
    for L, b in ((4096, 4), (16384, 1)):
        for causal in (False, True):
            rs = cp.random.RandomState(0)
            q, k, v = (_bench.random_array((b, h, L, d), "bfloat16", rs) for _ in range(3))
            t = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=causal))
            fl = 4 * b * h * L * L * d / (2 if causal else 1)
            print(f"{tag:4s} d{d} L{L} {'causal' if causal else 'full  '} {fl / t / 1e9:7.1f} TFLOP/s", flush=True)
