"""The sm_90a forward's three tile schedules (cuflash._sm90.FWD_SCHEDULE: one block a tile,
persistent blocks taking every gridDim.x-th tile, persistent blocks taking the next free
tile from a counter), the same kernel and inputs, side by side in one run:

    PYTHONPATH=. python3 tools/probe_persistent.py [--head-dims 64,128,256]
        [--seqlens 1024,4096,16384]

Prints TFLOP/s for each and the speed-ups over one block a tile (bf16, the benchmark's
cases: cuflash._bench.standard_cases).
"""

import argparse

import cupy as cp

import cuflash
from cuflash import _bench, _sm90


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dims", default="64,128,256")
    p.add_argument("--seqlens", default="1024,4096,16384")
    p.add_argument("--cudnn", action="store_true", help="also time torch SDPA's cuDNN backend")
    a = p.parse_args()
    dims = [int(x) for x in a.head_dims.split(",")]
    lens = [int(x) for x in a.seqlens.split(",")]
    # (a tree from before the schedules: its one launch, for a baseline in the same run)
    default = getattr(_sm90, "FWD_SCHEDULE", None)
    cases = _bench.standard_cases(seqlens=lens, head_dims=dims, dtypes=("bfloat16",))
    modes = ("tile", "static", "dynamic") if default else ("before",)
    print(f"{'case':44s} " + " ".join(f"{m:>8s}" for m in modes)
          + ("  static/tile dynamic/tile" if default else "")
          + ("    cudnn" if a.cudnn else ""))
    for case in cases:
        q, k, v = _bench.make_inputs(case)
        got = {}
        for mode in modes:
            if default:
                _sm90.FWD_SCHEDULE = mode
            got[mode] = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=case.causal))
        if default:
            _sm90.FWD_SCHEDULE = default
        if a.cudnn:
            try:
                got["cudnn"] = _bench.time_fn(
                    _bench._torch_sdpa("CUDNN_ATTENTION")(q, k, v, case.causal))
            except _bench.Skip:
                got["cudnn"] = float("nan")
        tf = {m: case.flops / ms / 1e9 for m, ms in got.items()}
        print(f"{case.label:44s} " + " ".join(f"{tf[m]:8.1f}" for m in modes)
              + (f"  {got['tile'] / got['static']:11.3f} {got['tile'] / got['dynamic']:12.3f}"
                 if default else "")
              + (f" {tf['cudnn']:8.1f}" if a.cudnn else ""), flush=True)
        q = k = v = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
