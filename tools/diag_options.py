"""Error spread of the options kernels against the plain same-precision reference, over
seeds (diagnostic for marginal tolerance cases).

    PYTHONPATH=.:tests python3 tools/diag_options.py
"""
import math
import sys

import cupy as cp
import numpy as np

import cuflash
from gpu_util import max_err, random_array, random_qkv, reference_backward, to_f32
from test_options_gpu import make_options, ref_options

CASES = [  # (name, Lq, Lk, Hq, Hk, d, causal, options)
    ("float16", 450, 300, 2, 2, 96, False, {"window": (-1, 5)}),
    ("float16", 450, 300, 2, 2, 96, True, {}),
    ("float16", 450, 300, 2, 2, 96, False, {"window": (-1, 0)}),
    ("float16", 450, 300, 2, 2, 96, False, {"window": (-1, 0), "softcap": 1e6}),
    ("float16", 1, 239, 4, 2, 40, False, {"alibi_slopes": "slopes"}),
    ("float16", 1, 239, 4, 2, 40, False, {}),
    ("bfloat16", 300, 450, 2, 2, 64, False, {"window": (-1, 5)}),
    ("bfloat16", 300, 450, 2, 2, 64, False, {}),
    ("bfloat16", 300, 450, 2, 2, 64, False, {"window": (4096, 4096)}),
    ("float16", 113, 203, 4, 2, 64, False, {"softcap": 0.8}),
    ("float16", 500, 700, 4, 2, 128, True, {"softcap": 5.0}),
    ("bfloat16", 500, 700, 4, 2, 128, True, {"softcap": 5.0}),
    ("float16", 300, 300, 2, 2, 64, False, {"softcap": 0.3}),
    ("float16", 1, 239, 2, 2, 64, False, {"softcap": 1.0}),
]
from cuflash import _dispatch, _kernels

if "--accurate-tanh" in sys.argv:
    _kernels.EXTRA_OPTIONS[:] = ["-DCUFLASH_TANH_ACCURATE"]
    _dispatch.clear_kernel_cache()
    CASES = [c for c in CASES if "softcap" in c[-1]]
    print("CUFLASH_TANH_ACCURATE")
for name, lq, lk, hq, hk, d, causal, opt in CASES:
    ratios = {"dq": [], "dk": [], "dv": []}
    for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 8):
        rng = np.random.default_rng(seed)
        q, k, v = random_qkv(cp, (2, hq, lq, d), (2, hk, lk, d), (2, hk, lk, d), name, rng)
        opts = make_options(cp, opt, q.shape)
        o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **opts)
        dout = random_array(cp, o.shape, name, rng)
        g = cuflash.attention_backward(dout, q, k, v, o, lse, causal=causal, **opts)
        q32, k32, v32, do32, o32 = (to_f32(cp, x) for x in (q, k, v, dout, o))
        ro = ref_options(cp, opts, q.shape)
        sc = 1 / math.sqrt(d)
        ref = reference_backward(cp, q32, k32, v32, do32, causal, sc, **ro)
        pl = reference_backward(cp, q32, k32, v32, do32, causal, sc, plain_dtype=name,
                                out=o32, **ro)
        for i, label in enumerate(ratios):
            ratios[label].append(max_err(cp, to_f32(cp, g[i]), ref[i]) / max_err(cp, pl[i], ref[i]))
    print(f"{name} {lq}x{lk} h{hq}:{hk} d{d} {list(opt)}: " + "  ".join(
        f"{k} ours/plain {min(v):.2f}..{max(v):.2f}" for k, v in ratios.items()), flush=True)
