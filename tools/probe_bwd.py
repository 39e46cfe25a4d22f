"""Where the backward pass's time goes: the whole pass in both modes, then the atomic
main kernel's pass rebuilt with compile-time probes (kernels/mainloop_bwd.cuh), e.g. one
stage left out (-DCUFLASH_PROBE_NO_RED, -DCUFLASH_PROBE_NO_DQ) or moved
(-DCUFLASH_DQ_AT=n).

    PYTHONPATH=. python3 tools/probe_bwd.py [--head-dim 128] [--seqlen 4096] [--causal]
        [--tile 64,128,8,1,2,1] [--variants ";-DCUFLASH_PROBE_NO_RED;-DCUFLASH_PROBE_NO_DQ"]
"""

import argparse
import math

import cupy as cp

from cuflash import _api, _bench, _dispatch, _kernels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tile", default=None, help="main kernel tile, as in BwdTile")
    p.add_argument("--variants", default=";-DCUFLASH_PROBE_NO_RED;-DCUFLASH_PROBE_NO_DQ")
    a = p.parse_args()
    case = _bench.Case(a.dtype, a.head_dim, a.causal, a.seqlen, max(1, 16384 // a.seqlen),
                       2048 // a.head_dim, "bwd")
    q, k, v = _bench.make_inputs(case)
    out, lse = _api.attention(q, k, v, causal=case.causal, return_lse=True)
    dout = _bench._dout_like(q)
    print(f"{case.label}  ({case.flops / 1e12:.2f} TFLOP per call)")

    def report(name, ms, frac=1.0):
        print(f"  {name:58s} {ms:8.3f} ms  {case.flops * frac / ms / 1e9:7.1f} TFLOP/s-equiv")

    for det in (False, True):
        ms = _bench.time_fn(lambda: _api.attention_backward(
            dout, q, k, v, out, lse, causal=case.causal, deterministic=det))
        report(f"whole backward as shipped, deterministic={det}", ms)
    ms = _bench.time_fn(lambda: _api.attention(q, k, v, causal=case.causal))
    report("forward (counted as 1/2.5 of the work)", ms, 1 / 2.5)

    grads = [cp.empty_like(x) for x in (q, k, v)]
    scale = 1.0 / math.sqrt(a.head_dim)
    arch = _dispatch.device_arch()
    tile = _kernels.BwdTile(*map(int, a.tile.split(","))) if a.tile else None
    for variant in a.variants.split(";"):
        _kernels.EXTRA_OPTIONS[:] = variant.split()
        _dispatch.clear_kernel_cache()
        spec = _kernels.bwd_spec(a.dtype, a.head_dim, a.head_dim, case.causal, True, arch, True,
                                 tile=tile)
        ms = _bench.time_fn(lambda: _dispatch.backward(
            dout, q, k, v, out, lse, *grads, causal=case.causal, scale=scale,
            deterministic=False, main_spec=spec))
        t = spec.tile
        report(f"atomic {t.block_m}x{t.block_n}w{t.num_warps}x{t.d_split}s{t.stages} "
               f"{variant or 'as is'}", ms)
    _kernels.EXTRA_OPTIONS[:] = []
    _dispatch.clear_kernel_cache()


if __name__ == "__main__":
    main()
