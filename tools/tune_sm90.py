"""sm_90a forward variants on the GPU, side by side with torch's cuDNN and flash backends:
tiles, stages and the scheduling techniques (intra-warpgroup overlap, pingpong), so that
cuflash/_kernels.py:SM90_FWD_TILES and docs/perf-log.md's technique ledger come from
measurements. Each variant's output is checked against the portable kernel first.

    PYTHONPATH=. python3 tools/tune_sm90.py [--head-dims 64,128] [--seqlens 4096,16384]
"""

import argparse
import math
import sys

from cuflash import _bench, _dispatch, _kernels, _options, _sm90

# (block_n, consumers, stages, overlap, pingpong)
CANDIDATES = {
    64: [(128, 2, 2, False, False), (128, 2, 2, True, False), (128, 2, 2, False, True),
          (128, 2, 2, True, True), (128, 3, 2, True, False), (128, 3, 2, False, False),
         (128, 2, 3, True, True), (192, 2, 2, True, True)],
    128: [(128, 2, 2, False, False), (128, 2, 2, True, False), (128, 2, 2, False, True),
          (128, 2, 2, True, True), (128, 2, 3, True, False), (176, 2, 2, True, False),
          (176, 2, 2, False, False), (192, 2, 2, True, False)],
    192: [(96, 2, 2, True, False), (96, 2, 2, False, False), (64, 2, 2, True, False)],
    256: [(80, 2, 2, True, False), (80, 2, 2, False, False), (64, 2, 2, True, False)],
}


def impl_spec(spec):
    def make(q, k, v, causal):
        cp = _bench._cupy()
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = cp.empty_like(q)
        lse = cp.empty(q.shape[:-1], dtype=cp.float32)
        with _sm90.disabled():
            ref = _bench.impl_cuflash(q, k, v, causal)()
        plain = _dispatch._option_args(_options.NONE, scale, q.shape[2], k.shape[2], None,
                                       q.shape[1], 0)
        _sm90.forward(spec, q, k, v, out, lse, scale=scale, option_args=plain)
        d = float(cp.abs(_f32(cp, out) - _f32(cp, ref)).max())
        if not d < 0.05:
            raise RuntimeError(f"differs from the portable kernel by {d}")
        return lambda: _sm90.forward(spec, q, k, v, out, lse, scale=scale,
                                     option_args=plain)
    return make


def _f32(cp, x):
    if x.dtype == cp.float16:
        return x.astype(cp.float32)
    return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,192,256")
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    for d in (int(x) for x in args.head_dims.split(",")):
        cases = [c for c in _bench.standard_cases(
                     seqlens=tuple(int(x) for x in args.seqlens.split(",")), head_dims=(d,),
                     dtypes=(args.dtype,), direction="fwd")]
        extra = {}
        for bn, cons, st, ov, pp in CANDIDATES[d]:
            tile = _kernels.Sm90FwdTile(bn, cons, st, ov, pp)
            name = f"{tile.block_m}x{bn}s{st}{'o' if ov else ''}{'p' if pp else ''}"
            extra[name] = _specs_by_causal(args.dtype, d, tile)
        rows = _bench.run(cases, impls=[_bench.CUDNN, _bench.FLASH], extra=extra)
        print(_bench.format_table(rows, baseline=_bench.CUDNN, ours="-"))
        print(flush=True)


def _specs_by_causal(dtype, d, tile):
    def make(q, k, v, causal):
        return impl_spec(_kernels.Sm90FwdSpec(dtype, d, causal, tile))(q, k, v, causal)
    return make


if __name__ == "__main__":
    sys.exit(main())
