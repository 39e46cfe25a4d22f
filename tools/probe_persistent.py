"""The sm_90a forward with persistent blocks (one a multiprocessor, each walking tiles)
against one block a tile, the same kernel and the same inputs, side by side in one run:

    PYTHONPATH=. python3 tools/probe_persistent.py [--head-dims 64,128,256]
        [--seqlens 1024,4096,16384]

Prints TFLOP/s for both launches and their ratio (bf16, the benchmark's cases:
cuflash._bench.standard_cases).
"""

import argparse

import cupy as cp

import cuflash
from cuflash import _bench, _sm90


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dims", default="64,128,256")
    p.add_argument("--seqlens", default="1024,4096,16384")
    a = p.parse_args()
    dims = [int(x) for x in a.head_dims.split(",")]
    lens = [int(x) for x in a.seqlens.split(",")]
    cases = _bench.standard_cases(seqlens=lens, head_dims=dims, dtypes=("bfloat16",))
    print(f"{'case':44s} {'per-tile':>9s} {'persistent':>11s} {'ratio':>6s}")
    for case in cases:
        q, k, v = _bench.make_inputs(case)
        got = {}
        for persistent in (False, True):
            _sm90.FWD_PERSISTENT = persistent
            ms = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=case.causal))
            got[persistent] = ms
        _sm90.FWD_PERSISTENT = True
        tf = {k_: case.flops / ms / 1e9 for k_, ms in got.items()}
        print(f"{case.label:44s} {tf[False]:9.1f} {tf[True]:11.1f} "
              f"{got[False] / got[True]:6.3f}", flush=True)
        q = k = v = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
