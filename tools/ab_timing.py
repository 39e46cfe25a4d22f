"""The same-call A/B timing of one tree (the one on PYTHONPATH), for tools/ab_forward.py
and tools/ab_backward.py: the bench's cases (bf16, batch * L = 16k tokens, 2048 / d
heads; _bench.standard_cases) timed by _bench.run, one line per (implementation, case),
cuflash's lines under TAG, torch's cuDNN and flash (FA2) backends beside them on request."""
import argparse

from cuflash import _bench


def main(direction: str, default_head_dims: str) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tag")
    p.add_argument("--cudnn", action="store_true", help="torch's cuDNN backend too")
    p.add_argument("--flash", action="store_true", help="torch's flash backend (FA2) too")
    p.add_argument("--seqlens", default="1024,4096,16384")
    p.add_argument("--head-dims", default=default_head_dims)
    if direction == "bwd":
        p.add_argument("--det", action="store_true", help="the deterministic mode instead")
    else:
        p.add_argument("--max-blocks", type=int, help="the persistent forward's blocks (_sm90)")
        p.add_argument("--max-key-tiles", type=int,
                       help="persistent blocks up to this many key tiles a tile (_sm90)")
        p.add_argument("--stages", type=int,
                       help="K/V ring stages of the sm_90a forward tiles of these head dims")
        p.add_argument("--short-key-tiles", type=int,
                       help="the short-launch tiles up to this many key tiles (0: none)")
    a = p.parse_args()
    if getattr(a, "short_key_tiles", None) is not None:
        from cuflash import _kernels

        for d, (_, tile) in list(_kernels.SM90_FWD_SHORT_TILES.items()):
            _kernels.SM90_FWD_SHORT_TILES[d] = (a.short_key_tiles, tile)
    if getattr(a, "stages", None):
        import dataclasses

        from cuflash import _kernels

        for d in map(int, a.head_dims.split(",")):
            _kernels.SM90_FWD_TILES[d] = dataclasses.replace(_kernels.SM90_FWD_TILES[d],
                                                            stages=a.stages)
            if d in _kernels.SM90_FWD_SHORT_TILES:
                n, tile = _kernels.SM90_FWD_SHORT_TILES[d]
                _kernels.SM90_FWD_SHORT_TILES[d] = (n, dataclasses.replace(tile, stages=a.stages))
    if getattr(a, "max_blocks", None) or getattr(a, "max_key_tiles", None):
        from cuflash import _sm90

        if a.max_blocks:
            _sm90.FWD_MAX_BLOCKS = a.max_blocks
        if a.max_key_tiles:
            _sm90.FWD_PERSISTENT_MAX_KEY_TILES = a.max_key_tiles
    ours = _bench.CUFLASH_DET if getattr(a, "det", False) else _bench.CUFLASH
    cases = _bench.standard_cases(tuple(map(int, a.seqlens.split(","))),
                                  tuple(map(int, a.head_dims.split(","))), ("bfloat16",),
                                  direction=direction)
    others = {_bench.CUDNN: "cudnn", _bench.FLASH: "fa2"}
    impls = ([ours] + ([_bench.CUDNN] if a.cudnn else [])
             + ([_bench.FLASH] if a.flash else []))
    rows = _bench.run(cases, impls, progress=False)
    for r in rows:
        c = r["case"]
        name = a.tag if r["impl"] == ours else others[r["impl"]]
        what = (f"{r['tflops']:7.1f} TFLOP/s" if r["tflops"] is not None
                else f"skip {r['note']}")
        print(f"{name:6s} d{c.head_dim:<3d} L{c.seqlen:<5d} "
              f"{'causal' if c.causal else 'full  '} {what}", flush=True)
