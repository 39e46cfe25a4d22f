"""Plain forward TFLOP/s (bf16, the bench's shapes: batch * L = 16k tokens, 2048 / d heads)
for the tree on PYTHONPATH, optionally torch's cuDNN backend beside it:

    PYTHONPATH=TREE python3 tools/ab_forward.py TAG [--cudnn] [--head-dims 64,128,256]
                                                    [--seqlens 1024,4096,16384]
                                                    [--max-blocks N]

For same-call A/B runs of two trees (docs/results/fwd-ab-*.txt)."""
import argparse

import cuflash
from cuflash import _bench

p = argparse.ArgumentParser()
p.add_argument("tag")
p.add_argument("--cudnn", action="store_true")
p.add_argument("--seqlens", default="1024,4096,16384")
p.add_argument("--head-dims", default="64,128,256")
p.add_argument("--max-blocks", type=int, help="the persistent forward's blocks (_sm90)")
a = p.parse_args()
if a.max_blocks:
    from cuflash import _sm90

    _sm90.FWD_MAX_BLOCKS = a.max_blocks
for d in map(int, a.head_dims.split(",")):
    for L in map(int, a.seqlens.split(",")):
        for causal in (False, True):
            case = _bench.Case("bfloat16", d, causal, L, max(1, 16384 // L), 2048 // d)
            q, k, v = _bench.make_inputs(case)
            impls = [(a.tag, lambda q, k, v, c: lambda: cuflash.attention(q, k, v, causal=c))]
            if a.cudnn:
                impls.append(("cudnn", _bench._torch_sdpa("CUDNN_ATTENTION")))
            for name, make in impls:
                try:
                    t = _bench.time_fn(make(q, k, v, causal))
                except _bench.Skip as e:
                    print(f"{name:6s} d{d} L{L} {'causal' if causal else 'full'}: skip {e}")
                    continue
                print(f"{name:6s} d{d:<3d} L{L:<5d} {'causal' if causal else 'full  '} "
                      f"{case.flops / t / 1e9:7.1f} TFLOP/s", flush=True)
