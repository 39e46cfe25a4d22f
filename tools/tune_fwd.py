"""Forward tile sweep on the GPU: time candidate tilings per head dim, next to torch's
flash backend, so that cuflash/_kernels.py:FWD_TILES can be set from measurements.

    PYTHONPATH=. python3 tools/tune_fwd.py [--head-dims 64,128] [--seqlens 4096]
"""

import argparse
import sys

from cuflash import _bench, _dispatch, _kernels

CANDIDATES = {
    # (block_m, block_n, warps, stages, min_blocks)
    64: [(128, 64, 4, 2, 2), (128, 64, 4, 1, 2), (128, 32, 4, 2, 2), (64, 64, 4, 2, 2),
         (128, 64, 8, 2, 1)],
    128: [(128, 32, 4, 2, 2), (128, 32, 4, 1, 2), (64, 64, 4, 2, 2), (128, 64, 8, 2, 1),
          (64, 32, 4, 2, 2), (128, 64, 4, 2, 2)],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlens", default="4096")
    p.add_argument("--dtypes", default="bfloat16")
    a = p.parse_args()
    arch = _dispatch.device_arch()
    cases = _bench.standard_cases(seqlens=tuple(int(s) for s in a.seqlens.split(",")),
                                  head_dims=tuple(int(d) for d in a.head_dims.split(",")),
                                  dtypes=tuple(a.dtypes.split(",")))
    rows = []
    for case in cases:
        extra = {}
        for cand in CANDIDATES[case.head_dim]:
            tile = _kernels.FwdTile(*cand)
            spec = _kernels.fwd_spec(case.dtype, case.head_dim, case.head_dim, case.causal, True,
                                     arch, tile=tile)
            if spec.smem_bytes > _dispatch.max_smem_per_block():
                continue
            name = "t{}x{}w{}s{}b{}".format(*cand)
            extra[name] = (lambda s: lambda q, k, v, c: _bench.impl_cuflash(q, k, v, c, spec=s))(spec)
        rows += _bench.run([case], impls=[_bench.FLASH], extra=extra)
    # one line per (case, tile)
    for r in rows:
        t = f"{r['tflops']:7.1f}" if r["tflops"] else r["note"]
        print(f"{r['case'].label:40s} {r['impl']:18s} {t}")


if __name__ == "__main__":
    sys.exit(main())
