"""The softcap forward's exp2 split between the special-function unit and the FMA pipe
(kernels/flash_fwd_sm90.cu, CUFLASH_SOFTCAP_EXP2_FMA_PER8), on an sm_90 GPU: for each
share, the softcap forward's time against the plain kernel's (bf16, L = 4096, B = 4,
H = 2048 / d), and the forward's error against the plain same-precision reference (the
tests allow 2 times its error, plus 1e-5).

    PYTHONPATH=.:tests python3 tools/tune_exp2.py [--per8 0 2 4 6 8] [--seeds 4]
"""
import argparse
import math

import cupy as cp
import numpy as np

import cuflash
from cuflash import _bench, _dispatch, _kernels
from gpu_util import kernel_path, max_err, random_qkv, reference, to_f32

ERROR_CASES = [  # (dtype, Lq, Lk, H, d, causal, softcap)
    ("float16", 113, 203, 4, 64, False, 0.8),
    ("float16", 500, 700, 4, 128, True, 5.0),
    ("bfloat16", 500, 700, 4, 128, True, 5.0),
    ("bfloat16", 1023, 1023, 2, 256, False, 30.0),
]


def error_ratios(seeds):
    rows = []
    for name, lq, lk, h, d, causal, cap in ERROR_CASES:
        worst_o = worst_l = 0.0
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(cp, (2, h, lq, d), (2, h, lk, d), (2, h, lk, d), name, rng)
            with kernel_path(cp, "sm90"):
                o, lse = cuflash.attention(q, k, v, causal=causal, softcap=cap, return_lse=True)
            q32, k32, v32 = (to_f32(cp, x) for x in (q, k, v))
            sc = 1 / math.sqrt(d)
            ref_o, ref_l = reference(cp, q32, k32, v32, causal, sc, softcap=cap)
            pl_o, pl_l = reference(cp, q32, k32, v32, causal, sc, plain_dtype=name, softcap=cap)
            worst_o = max(worst_o, max_err(cp, to_f32(cp, o), ref_o)
                          / (2 * max_err(cp, pl_o, ref_o) + 1e-5))
            worst_l = max(worst_l, max_err(cp, lse, ref_l) / (2 * max_err(cp, pl_l, ref_l) + 1e-5))
        rows.append(f"{name} {lq}x{lk} d{d} {'causal ' if causal else ''}softcap {cap}: "
                    f"out {worst_o:.2f}, lse {worst_l:.2f} of the allowed error")
    return rows


def timings():
    rows = []
    for d in (64, 128, 256):
        h = 2048 // d
        rs = cp.random.RandomState(0)
        q, k, v = (_bench.random_array((4, h, 4096, d), "bfloat16", rs) for _ in range(3))
        for causal in (False, True):
            plain = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=causal))
            cap = _bench.time_fn(lambda: cuflash.attention(q, k, v, causal=causal, softcap=30.0))
            rows.append(f"d{d} {'causal' if causal else 'full  '} softcap/plain {cap / plain:.3f} "
                        f"({plain:.3f} / {cap:.3f} ms)")
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--per8", type=int, nargs="*", default=[0, 2, 4, 6, 8])
    p.add_argument("--seeds", type=int, default=4)
    a = p.parse_args()
    if int(cp.cuda.Device().compute_capability) != 90:
        raise SystemExit("tune_exp2: needs an sm_90 GPU")
    for per8 in a.per8:
        _kernels.EXTRA_OPTIONS[:] = [f"-DCUFLASH_SOFTCAP_EXP2_FMA_PER8={per8}"]
        _dispatch.clear_kernel_cache()
        print(f"== {per8} of 8 tiles' exp2 on the FMA pipe", flush=True)
        for row in timings() + error_ratios(a.seeds):
            print("  " + row, flush=True)
    _kernels.EXTRA_OPTIONS[:] = []
    _dispatch.clear_kernel_cache()


if __name__ == "__main__":
    main()
