"""Backward tile sweep on the GPU: time candidate tilings of the main backward kernel per
head dim (atomic dQ, and dK/dV only with the deterministic dQ pass), next to torch's
flash backend, so that cuflash/_kernels.py:BWD_TILES can be set from measurements.
Candidates that spill are timed too (the sweep is about speed; CI rejects spills).

    PYTHONPATH=. python3 tools/tune_bwd.py [--head-dims 64,128] [--seqlens 4096]
"""

import argparse
import sys

from cuflash import _bench, _dispatch, _kernels

CANDIDATES = {
    # (block_m, block_n, warps, d_split, stages, min_blocks)
    64: [(64, 128, 8, 1, 2, 1), (32, 128, 4, 1, 2, 1), (32, 128, 4, 1, 2, 2),
         (64, 128, 4, 1, 2, 1), (32, 64, 2, 1, 2, 4)],
    128: [(64, 128, 8, 1, 2, 1), (32, 128, 8, 1, 2, 1), (64, 128, 8, 1, 1, 1),
          (64, 64, 4, 1, 2, 2)],
}
# The deterministic dQ pass: (block_m, block_n, warps, stages, min_blocks).
DQ_CANDIDATES = {
    64: [(64, 64, 4, 2, 2), (128, 64, 8, 2, 1), (64, 128, 4, 2, 1), (128, 32, 4, 2, 1)],
    128: [(64, 64, 4, 2, 1), (64, 32, 4, 2, 2), (128, 64, 8, 2, 1), (128, 32, 4, 2, 1)],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlens", default="4096")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--modes", default="atomic,det,dq")
    a = p.parse_args()
    arch = _dispatch.device_arch()
    cases = _bench.standard_cases(seqlens=tuple(int(s) for s in a.seqlens.split(",")),
                                  head_dims=tuple(int(d) for d in a.head_dims.split(",")),
                                  dtypes=tuple(a.dtypes.split(",")), direction="bwd")
    rows = []
    for case in cases:
        extra = {}
        for mode in a.modes.split(","):
            if mode == "dq":
                for cand in DQ_CANDIDATES[case.head_dim]:
                    spec = _kernels.bwd_dq_spec(case.dtype, case.head_dim, case.head_dim,
                                                case.causal, True, arch,
                                                tile=_kernels.FwdTile(*cand))
                    if spec.smem_bytes > _dispatch.max_smem_per_block():
                        continue
                    extra["dq-{}x{}w{}s{}b{}".format(*cand)] = (
                        lambda s: lambda q, k, v, c: _bench.impl_cuflash_bwd(
                            q, k, v, c, deterministic=True, dq_spec=s))(spec)
                continue
            for cand in CANDIDATES[case.head_dim]:
                tile = _kernels.BwdTile(*cand)
                spec = _kernels.bwd_spec(case.dtype, case.head_dim, case.head_dim, case.causal,
                                         True, arch, mode == "atomic", tile=tile)
                if spec.smem_bytes > _dispatch.max_smem_per_block():
                    continue
                name = "{}-{}x{}w{}x{}s{}b{}".format(mode, *cand)
                extra[name] = (lambda s: lambda q, k, v, c:
                               _bench.impl_cuflash_bwd(q, k, v, c, spec=s))(spec)
        rows += _bench.run([case], impls=[_bench.FLASH], extra=extra)
    for r in rows:
        t = f"{r['tflops']:7.1f}" if r["tflops"] else r["note"]
        print(f"{r['case'].label:44s} {r['impl']:28s} {t}")


if __name__ == "__main__":
    sys.exit(main())
