"""How many of the sm_90a forward's exponentials to compute on the FMA pipe (exp2_poly)
instead of the special-function unit: one run, every variant beside torch's cuDNN backend.

    PYTHONPATH=. python3 tools/tune_poly.py [--head-dims 64,128,256] [--seqlens 1024,4096,16384]
        [--plain 0,2,3] [--softcap 0,2,3,4]

Each variant is the shipped tile of its head dim (cuflash/_kernels.py:SM90_FWD_TILES) with
``poly_exp`` (plain kernels) or ``poly_exp_softcap`` (the options kernel with softcap 30)
set; its output is checked against variant 0's first. bf16, B*H*L = 64 * 16384 rows of
queries, CUDA-event medians (cuflash._bench.time_fn). Prints, per case, milliseconds and
the time of variant 0 over each variant (> 1: faster), and cuDNN's time over ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cuflash import _bench, _kernels

DTYPE = "bfloat16"


def _batch(seqlen: int) -> tuple[int, int]:
    """(B, H) with B * L = 16384 * 4 (at least one), H = 16."""
    return max(1, 65536 // seqlen), 16


def _f32(cp, x):
    return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)


def run_variants(d, seqlen, causal, softcap, values, base_tile):
    import cuflash
    cp = _bench._cupy()
    b, h = _batch(seqlen)
    rs = cp.random.RandomState(0)
    q, k, v = (_bench.random_array((b, h, seqlen, d), DTYPE, rs) for _ in range(3))
    opts = {"softcap": 30.0} if softcap else {}
    times, ref = {}, None
    for val in values:
        field = "poly_exp_softcap" if softcap else "poly_exp"
        _kernels.SM90_FWD_TILES[d] = dataclasses.replace(base_tile, **{field: val})

        def fwd():
            return cuflash.attention(q, k, v, causal=causal, **opts)

        out = _f32(cp, fwd())
        if ref is None:
            ref = out
        diff = float(cp.abs(out - ref).max())
        if not diff < 0.02:
            raise RuntimeError(f"d{d} L{seqlen} poly {val}: differs from variant 0 by {diff}")
        times[val] = _bench.time_fn(fwd)
    _kernels.SM90_FWD_TILES[d] = base_tile
    cudnn = None
    if not softcap:
        cudnn = _bench.time_fn(_bench._torch_sdpa("CUDNN_ATTENTION")(q, k, v, causal))
    return times, cudnn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--plain", default="0,2,3")
    ap.add_argument("--softcap", default="0,2,3,4")
    args = ap.parse_args()
    plain = [int(x) for x in args.plain.split(",")]
    capped = [int(x) for x in args.softcap.split(",")]
    for d in (int(x) for x in args.head_dims.split(",")):
        base = _kernels.SM90_FWD_TILES[d]
        for softcap, values in ((False, plain), (True, capped)):
            if len(values) < 2 and softcap:
                continue
            for causal in (False, True):
                if softcap and causal:
                    continue
                for seqlen in (int(x) for x in args.seqlens.split(",")):
                    times, cudnn = run_variants(d, seqlen, causal, softcap, values, base)
                    t0 = times[values[0]]
                    cells = "  ".join(f"p{k}={t:.3f}ms ({t0 / t:.3f})" for k, t in times.items())
                    extra = "" if cudnn is None else "  cudnn÷: " + " ".join(
                        f"{cudnn / t:.3f}" for t in times.values())
                    print(f"d{d:<3d} L{seqlen:<5d} {'causal' if causal else 'full  '} "
                          f"{'softcap' if softcap else 'plain  '} {cells}{extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
