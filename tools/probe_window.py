"""The 1k sliding-window backward against full causal at L = 16384 (bf16, d128, B = 1,
H = 16, as in tools/bench_options.py), one call each after a warm-up, for a profiler to
split into kernels:

    ncu --metrics gpu__time_duration.sum python3 tools/probe_window.py
    PYTHONPATH=. python3 tools/probe_window.py --time     # whole calls, CUDA events

The backward is several launches (dQ buffer zeroed, delta, the main kernel, the dQ
conversion); the window's main kernel walks ~18 query tiles a block where causal's walk
~128, so the launches around it and each block's start and epilogue weigh more.
"""

import argparse
import sys

import cupy as cp

import cuflash
from cuflash import _bench

L, B, H, D = 16384, 1, 16, 128


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--time", action="store_true", help="time the calls (else: one each)")
    p.add_argument("--window", type=int, default=1024)
    a = p.parse_args()
    rs = cp.random.RandomState(0)
    q, k, v = (_bench.random_array((B, H, L, D), "bfloat16", rs) for _ in range(3))
    dout = _bench._dout_like(q)
    cases = {"causal": {}, f"window ({a.window}, 0)": {"window": (a.window, -1)}}
    for name, opts in cases.items():
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, **opts)

        def bwd():
            return cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, **opts)

        bwd()  # compile, warm
        cp.cuda.Device().synchronize()
        if a.time:
            print(f"{name}: backward {_bench.time_fn(bwd):.3f} ms", file=sys.stderr)
        else:
            print(f"{name}: one backward call", file=sys.stderr)
            bwd()
            cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
