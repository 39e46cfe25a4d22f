"""Plain forward TFLOP/s, d256 and d128 (bf16, L 4k and 16k), for the tree on PYTHONPATH:

    PYTHONPATH=TREE python3 tools/ab_forward.py TAG

For same-call A/B runs of two trees (docs/results/fwd-ab-*.txt)."""
import sys

import cuflash
from cuflash import _bench

tag = sys.argv[1]
for d, h in ((256, 8), (128, 16)):
    for L, b in ((4096, 4), (16384, 1)):
        for causal in (False, True):
            case = _bench.Case("bfloat16", d, causal, L, b, h)
            q, k, v = _bench.make_inputs(case)
            t = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=causal))
            print(f"{tag:4s} d{d} L{L} {'causal' if causal else 'full  '} "
                  f"{case.flops / t / 1e9:7.1f} TFLOP/s", flush=True)
