"""Dropout forward cost, d64 and d128 (bf16, B4 H16 L4096, p = 0.1), for the tree on PYTHONPATH:

    PYTHONPATH=TREE python3 tools/bench_dropout.py TAG

One line a case: the plain call, the dropout call and their ratio (same-call A/B runs of two
trees: docs/perf-log.md d5)."""
import sys

import cuflash
from cuflash import _bench

tag = sys.argv[1]
for d in (64, 128):
    for causal in (False, True):
        q, k, v = _bench.make_inputs(_bench.Case("bfloat16", d, causal, 4096, 4, 16))
        t0 = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=causal))
        t1 = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=causal, dropout_p=0.1,
                                                      seed=7))
        print(f"{tag:6s} d{d} {'causal' if causal else 'full  '} plain {t0:.3f} ms "
              f"dropout {t1:.3f} ms  x{t1 / t0:.3f}", flush=True)
