"""Error spread of the options kernels against the plain same-precision reference, over
seeds: the ratio ours / plain of each gradient's max error (the tests allow 2, plus 1e-5),
for the portable ("mma") and Hopper ("sm90") kernel families, and for the portable
kernels compiled with diagnostic macros (--variants): CUFLASH_TANH_ACCURATE (an accurate
softcap tanh) and CUFLASH_WIDE_DTANH (the softcap's derivative kept in float32).

    PYTHONPATH=.:tests python3 tools/diag_options.py [--seeds 8] [--variants] [--softcap]
"""
import argparse
import math

import cupy as cp
import numpy as np

import cuflash
from cuflash import _dispatch, _kernels
from gpu_util import kernel_path, max_err, random_array, random_qkv, reference_backward, to_f32
from test_options_gpu import make_options, ref_options

CASES = [  # (name, Lq, Lk, Hq, Hk, d, causal, options)
    ("float16", 450, 300, 2, 2, 96, False, {"window": (-1, 5)}),
    ("float16", 450, 300, 2, 2, 96, True, {}),
    ("float16", 1, 239, 4, 2, 40, False, {"alibi_slopes": "slopes"}),
    ("bfloat16", 300, 450, 2, 2, 64, False, {"window": (-1, 5)}),
    ("float16", 113, 203, 4, 2, 64, False, {"softcap": 0.8}),
    ("float16", 500, 700, 4, 2, 128, True, {"softcap": 5.0}),
    ("bfloat16", 500, 700, 4, 2, 128, True, {"softcap": 5.0}),
    ("float16", 300, 300, 2, 2, 64, False, {"softcap": 0.3}),
    # the shapes of two marginal misses of the portable kernels (docs/perf-log.md)
    ("float16", 300, 450, 4, 2, 64, True, {"softcap": 2.0, "window": (64, 16)}),
    ("float16", 300, 310, 4, 2, 96, True, {"softcap": 5.0, "dropout_p": 0.2, "seed": "random"}),
    ("bfloat16", 300, 310, 4, 2, 128, True, {"softcap": 5.0, "dropout_p": 0.2,
                                             "seed": "random"}),
]
VARIANTS = {"mma": [], "mma accurate-tanh": ["-DCUFLASH_TANH_ACCURATE"],
            "mma wide-dtanh": ["-DCUFLASH_WIDE_DTANH"],
            "mma both": ["-DCUFLASH_TANH_ACCURATE", "-DCUFLASH_WIDE_DTANH"]}


def ratios(case, path, seeds):
    name, lq, lk, hq, hk, d, causal, opt = case
    out = {"dq": [], "dk": [], "dv": []}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        q, k, v = random_qkv(cp, (2, hq, lq, d), (2, hk, lk, d), (2, hk, lk, d), name, rng)
        opts = make_options(cp, opt, q.shape)
        with kernel_path(cp, path):
            o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **opts)
            dout = random_array(cp, o.shape, name, rng)
            g = cuflash.attention_backward(dout, q, k, v, o, lse, causal=causal, **opts)
        q32, k32, v32, do32, o32 = (to_f32(cp, x) for x in (q, k, v, dout, o))
        ro = ref_options(cp, opts, q.shape, lk)
        sc = 1 / math.sqrt(d)
        ref = reference_backward(cp, q32, k32, v32, do32, causal, sc, **ro)
        pl = reference_backward(cp, q32, k32, v32, do32, causal, sc, plain_dtype=name,
                                out=o32, **ro)
        for i, label in enumerate(out):
            out[label].append(max_err(cp, to_f32(cp, g[i]), ref[i]) / max_err(cp, pl[i], ref[i]))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--variants", action="store_true", help="also the diagnostic macros")
    p.add_argument("--softcap", action="store_true", help="softcap cases only")
    a = p.parse_args()
    cases = [c for c in CASES if not a.softcap or "softcap" in c[-1]]
    runs = {"mma": []}
    if int(cp.cuda.Device().compute_capability) == 90:
        runs["sm90"] = []
    if a.variants:
        runs.update({k: v for k, v in VARIANTS.items() if k != "mma"})
    for label, defines in runs.items():
        _kernels.EXTRA_OPTIONS[:] = defines
        _dispatch.clear_kernel_cache()
        path = "sm90" if label == "sm90" else "mma"
        print(f"== {label} (max error / plain's; the tests allow 2)", flush=True)
        for case in cases:
            r = ratios(case, path, a.seeds)
            name, lq, lk, hq, hk, d, causal, opt = case
            print(f"  {name:8s} {lq}x{lk} h{hq}:{hk} d{d} {'causal ' if causal else ''}"
                  f"{list(opt)}: "
                  + "  ".join(f"{k} {min(v):.2f}..{max(v):.2f}" for k, v in r.items()),
                  flush=True)
    _kernels.EXTRA_OPTIONS[:] = []


if __name__ == "__main__":
    main()
