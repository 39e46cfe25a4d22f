"""Forward tile sweep on the GPU: time candidate tilings per head dim, next to torch's
flash backend, so that cuflash/_kernels.py:FWD_TILES can be set from measurements.

    PYTHONPATH=. python3 tools/tune_fwd.py [--head-dims 64,128] [--seqlens 4096] [--options]

--options times the options kernels (FWD_OPTION_TILES) with a window that hides nothing
and, as a second row per tile, softcap + ALiBi.
"""

import argparse
import sys

from cuflash import _bench, _dispatch, _kernels, _options

CANDIDATES = {
    # (block_m, block_n, warps, stages, min_blocks)
    64: [(128, 64, 4, 2, 2), (128, 64, 4, 1, 2), (128, 32, 4, 2, 2), (64, 64, 4, 2, 2),
         (128, 64, 8, 2, 1)],
    128: [(128, 32, 4, 2, 2), (128, 32, 4, 1, 2), (64, 64, 4, 2, 2), (128, 64, 8, 2, 1),
          (64, 32, 4, 2, 2), (128, 64, 4, 2, 2)],
}
OPTION_CANDIDATES = {
    128: [(64, 64, 4, 1, 2), (64, 64, 4, 2, 2), (128, 64, 8, 2, 1), (128, 32, 8, 2, 1),
          (64, 32, 4, 2, 2), (128, 128, 8, 2, 1), (64, 128, 4, 1, 2)],
}


def impl_options(spec, opts):
    """A factory timing _dispatch.forward with ``spec`` and these options."""
    def make(q, k, v, causal):
        cp = _bench._cupy()
        out = cp.empty_like(q)
        lse = cp.empty(q.shape[:-1], dtype=cp.float32)
        scale = 1.0 / q.shape[-1] ** 0.5
        slopes = None
        if opts.alibi_slopes is not None:
            slopes = cp.broadcast_to(cp.full(q.shape[1], 0.01, cp.float32), q.shape[:2])
        return lambda: _dispatch.forward(q, k, v, out, lse, causal=causal, scale=scale,
                                         spec=spec, options=opts, alibi_slopes=slopes)
    return make


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlens", default="4096")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--options", action="store_true")
    a = p.parse_args()
    arch = _dispatch.device_arch()
    cases = _bench.standard_cases(seqlens=tuple(int(s) for s in a.seqlens.split(",")),
                                  head_dims=tuple(int(d) for d in a.head_dims.split(",")),
                                  dtypes=tuple(a.dtypes.split(",")))
    rows = []
    for case in cases:
        extra = {}
        table = OPTION_CANDIDATES if a.options else CANDIDATES
        for cand in table[case.head_dim]:
            tile = _kernels.FwdTile(*cand)
            spec = _kernels.fwd_spec(case.dtype, case.head_dim, case.head_dim, case.causal, True,
                                     arch, tile=tile, options=a.options)
            if spec.smem_bytes > _dispatch.max_smem_per_block():
                continue
            name = "t{}x{}w{}s{}b{}".format(*cand)
            if not a.options:
                extra[name] = (lambda s: lambda q, k, v, c: _bench.impl_cuflash(q, k, v, c, spec=s))(spec)
                continue
            L = case.seqlen
            w = (L, 0) if case.causal else (L, L)
            window = _options.Options(w, 0.0, None)
            capped = _options.Options(w, 30.0, "alibi")  # (slopes made by impl_options)
            extra[name + " mask"] = impl_options(spec, window)
            extra[name + " cap+alibi"] = impl_options(spec, capped)
        rows += _bench.run([case], impls=[_bench.FLASH, _bench.CUFLASH], extra=extra)
    # one line per (case, tile)
    for r in rows:
        t = f"{r['tflops']:7.1f}" if r["tflops"] else r["note"]
        print(f"{r['case'].label:40s} {r['impl']:18s} {t}")


if __name__ == "__main__":
    sys.exit(main())
