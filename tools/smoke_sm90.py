"""Quick check of the sm_90a forward kernel against the portable one, one case at a time
(prints as it goes, so a hang shows where): python3 tools/smoke_sm90.py"""

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cuflash  # noqa: E402
from cuflash import _sm90  # noqa: E402
from gpu_util import random_qkv, to_f32  # noqa: E402

rng = np.random.default_rng(0)
for name, D, L, causal in (("bfloat16", 128, 256, False), ("bfloat16", 128, 1000, True),
                           ("float16", 64, 777, False), ("float16", 40, 300, True)):
    shape = (2, 4, L, D)
    q, k, v = random_qkv(cp, shape, shape, shape, name, rng)
    print(name, D, L, causal, flush=True)
    _sm90.enabled = True
    o1, l1 = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    cp.cuda.runtime.deviceSynchronize()
    print("  sm90 ran", flush=True)
    _sm90.enabled = False
    o2, l2 = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    d = float(cp.abs(to_f32(cp, o1) - to_f32(cp, o2)).max())
    dl = float(cp.abs(l1 - l2).max())
    print(f"  max |sm90 - mma|: out {d:.3g}, lse {dl:.3g}; "
          f"nan {bool(cp.isnan(to_f32(cp, o1)).any())}", flush=True)
