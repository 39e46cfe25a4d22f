"""One call of each options kernel next to the plain one (bf16, d128, L = 4096, B = 4,
H = 16), for a profiler to compare: forward plain / window (L, L) / softcap / ALiBi /
dropout, then the same backward. Under ncu, profile the sm_90a launches only:

    ncu --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \\
        -k regex:sm90 python3 tools/probe_options.py

With --once each variant runs once (for the profiler); otherwise the script prints the
time of each (CUDA events, cuflash._bench.time_fn).
"""
import sys

import numpy as np

import cuflash
from cuflash import _bench

L, B, H, D = 4096, 4, 16, 128


def main():
    cp = _bench._cupy()
    rs = cp.random.RandomState(0)
    q, k, v = (_bench.random_array((B, H, L, D), "bfloat16", rs) for _ in range(3))
    slopes = cp.asarray(2.0 ** (-8.0 * np.arange(1, H + 1) / H), dtype=cp.float32)
    variants = [("plain", {}), ("window (L, L)", {"window": (L, L)}),
                ("softcap 30", {"softcap": 30.0}), ("alibi", {"alibi_slopes": slopes}),
                ("dropout 0.1", {"dropout_p": 0.1, "seed": 1})]
    profiled = "--once" in sys.argv
    for name, opts in variants:
        out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
        dout = _bench._dout_like(q)
        fwd = lambda: cuflash.attention(q, k, v, **opts)  # noqa: E731
        bwd = lambda: cuflash.attention_backward(dout, q, k, v, out, lse, **opts)  # noqa: E731
        if profiled:
            fwd(), bwd()
            continue
        print(f"{name:16s} fwd {_bench.time_fn(fwd):7.3f} ms  bwd {_bench.time_fn(bwd):7.3f} ms",
              flush=True)


if __name__ == "__main__":
    main()
