"""Option costs of one tree (the one on PYTHONPATH), for same-call A/B runs of trees or
tile choices: bf16, B = 4, H = 16, L = 4096 by default, forward and backward times of the
plain call and of each option (softcap, ALiBi, dropout), and each option's time over the
plain call's (tools/bench_options.py's table 1, shorter):

    PYTHONPATH=TREE python3 tools/ab_options.py TAG [--head-dims 128] [--causal]
                                                    [--pingpong] [--no-bwd]
                                                    [--tile BLOCK_N,CONSUMERS,OVERLAP]

--pingpong gives the sm_90a forward's tiles of these head dims pingpong turns between
their consumer warpgroups (_kernels.SM90_FWD_TILES), to measure what the turns do;
--tile replaces those tiles (keys a step, consumer warpgroups, 1 or 0: the overlap), for
the plain kernels and the options kernels alike."""
import argparse
import dataclasses

from bench_options import cuflash_fns, slopes_for

from cuflash import _bench


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tag")
    p.add_argument("--head-dims", default="128")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--pingpong", action="store_true")
    p.add_argument("--no-bwd", action="store_true")
    p.add_argument("--tile", help="BLOCK_N,CONSUMERS,OVERLAP for the sm_90a forward")
    a = p.parse_args()
    from cuflash import _kernels

    cp = _bench._cupy()
    L, B, H = a.seqlen, 4, 16
    for d in map(int, a.head_dims.split(",")):
        if a.tile:
            block_n, consumers, overlap = map(int, a.tile.split(","))
            _kernels.SM90_FWD_TILES[d] = dataclasses.replace(
                _kernels.SM90_FWD_TILES[d], block_n=block_n, consumers=consumers,
                overlap=bool(overlap))
        if a.pingpong:
            _kernels.SM90_FWD_TILES[d] = dataclasses.replace(_kernels.SM90_FWD_TILES[d],
                                                            pingpong=True)
        rs = cp.random.RandomState(0)
        q, k, v = (_bench.random_array((B, H, L, d), "bfloat16", rs) for _ in range(3))
        options = {"plain": {}, "softcap": {"softcap": 30.0},
                   "alibi": {"alibi_slopes": slopes_for(cp, H)},
                   "dropout": {"dropout_p": 0.1, "seed": 1}}
        times = {}
        for name, opts in options.items():
            fwd_fn, bwd_fn = cuflash_fns(q, k, v, a.causal, opts)
            times[name] = (_bench.time_fn(fwd_fn),
                           None if a.no_bwd else _bench.time_fn(bwd_fn))
        for name, (fwd, bwd) in times.items():
            r_f = fwd / times["plain"][0]
            line = (f"{a.tag:10s} d{d:<3d} L{L} {'causal' if a.causal else 'full  '} "
                    f"{name:8s} fwd {fwd:7.3f} ms ({r_f:4.2f})")
            if bwd is not None:
                line += f"  bwd {bwd:7.3f} ms ({bwd / times['plain'][1]:4.2f})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
