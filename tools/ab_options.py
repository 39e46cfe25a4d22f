"""Option costs of one tree (the one on PYTHONPATH), for same-call A/B runs of trees or
tile choices: bf16, B = 4, H = 16, L = 4096 by default, forward and backward times of the
plain call and of each option (softcap, ALiBi, dropout), and each option's time over the
plain call's (tools/bench_options.py's table 1, shorter):

    PYTHONPATH=TREE python3 tools/ab_options.py TAG [--head-dims 128] [--causal]
                                                    [--pingpong] [--no-bwd]

--pingpong gives the sm_90a forward's tiles of these head dims pingpong turns between
their consumer warpgroups (_kernels.SM90_FWD_TILES), to measure what the turns do."""
import argparse
import dataclasses

import numpy as np

from cuflash import _bench


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tag")
    p.add_argument("--head-dims", default="128")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--pingpong", action="store_true")
    p.add_argument("--no-bwd", action="store_true")
    a = p.parse_args()
    import cuflash
    from cuflash import _kernels

    cp = _bench._cupy()
    L, B, H = a.seqlen, 4, 16
    for d in map(int, a.head_dims.split(",")):
        if a.pingpong:
            _kernels.SM90_FWD_TILES[d] = dataclasses.replace(_kernels.SM90_FWD_TILES[d],
                                                            pingpong=True)
        rs = cp.random.RandomState(0)
        q, k, v = (_bench.random_array((B, H, L, d), "bfloat16", rs) for _ in range(3))
        dout = _bench._dout_like(q)
        slopes = cp.asarray(2.0 ** (-8.0 * np.arange(1, H + 1) / H), dtype=cp.float32)
        options = {"plain": {}, "softcap": {"softcap": 30.0},
                   "alibi": {"alibi_slopes": slopes},
                   "dropout": {"dropout_p": 0.1, "seed": 1}}
        times = {}
        for name, opts in options.items():
            out, lse = cuflash.attention(q, k, v, causal=a.causal, return_lse=True, **opts)
            fwd = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=a.causal, **opts))
            bwd = None if a.no_bwd else _bench.time_fn(lambda: cuflash.attention_backward(
                dout, q, k, v, out, lse, causal=a.causal, **opts))
            times[name] = (fwd, bwd)
        for name, (fwd, bwd) in times.items():
            r_f = fwd / times["plain"][0]
            line = (f"{a.tag:10s} d{d:<3d} L{L} {'causal' if a.causal else 'full  '} "
                    f"{name:8s} fwd {fwd:7.3f} ms ({r_f:4.2f})")
            if bwd is not None:
                line += f"  bwd {bwd:7.3f} ms ({bwd / times['plain'][1]:4.2f})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
