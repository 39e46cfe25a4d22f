"""Attention speed: cuflash next to the attention a user would pick instead.

Each class times its whole grid once, in ``setup_cache``, with the project's harness
(``cuflash/_bench.py``: CUDA events, warm-up, median of rounds, random non-zero data),
and each parametrised ``track_seconds`` reports one cell of it. Timing the grid in one
process keeps a run of ~500 cells to a few minutes; the forked child of each cell does
no GPU work. TFLOP/s are derived in the report (``asv_bench/report.py``), since asv reads
a larger number as a regression.

The harness is loaded by path from this checkout, while ``import cuflash`` finds
whichever cuflash is on ``sys.path``: that is how older commits are backfilled
(``tools/asv_device.sh``). An implementation that a commit or machine does not have
(torch missing, a backend that refuses, no backward yet) is skipped, shown as n/a.

``CUFLASH_ASV_IMPLS`` (comma-separated) narrows the implementations that are timed.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

DTYPES = ["bfloat16", "float16"]
HEAD_DIMS = [64, 128]
CAUSAL = [False, True]
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
TOKENS = 16384  # batch * seqlen
HIDDEN = 2048  # heads * head_dim

FWD_IMPLS = ["cuflash", "torch_flash", "torch_cudnn", "torch_efficient", "cupy_naive"]
BWD_IMPLS = FWD_IMPLS[:1] + ["cuflash_det"] + FWD_IMPLS[1:]

# Shorter rounds than `python -m cuflash bench`: ~500 cells per commit.
TIMING = {"warmup_ms": 30.0, "rounds": 5, "min_round_ms": 25.0}


def harness():
    """``cuflash/_bench.py`` of this checkout, as a module of its own."""
    path = pathlib.Path(__file__).resolve().parents[2] / "cuflash" / "_bench.py"
    spec = importlib.util.spec_from_file_location("cuflash_asv_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _key(*params):
    return "|".join(str(p) for p in params)


def _selected(impls):
    wanted = os.environ.get("CUFLASH_ASV_IMPLS")
    return impls if not wanted else [i for i in impls if i in wanted.split(",")]


def sweep(direction, impls):
    """{key(impl, dtype, d, causal, L): seconds or None} for one direction's grid."""
    bench = harness()
    cases = [bench.Case(dt, d, c, L, max(1, TOKENS // L), HIDDEN // d, direction)
             for dt in DTYPES for d in HEAD_DIMS for c in CAUSAL for L in SEQLENS]
    rows = bench.run(cases, impls=_selected(impls), timing=TIMING)
    times = {}
    for r in rows:
        c = r["case"]
        ms = r["ms"]
        times[_key(r["impl"], c.dtype, c.head_dim, c.causal, c.seqlen)] = (
            ms / 1e3 if ms else None, r["note"])
    return times


class _Grid:
    param_names = ["impl", "dtype", "head_dim", "causal", "seqlen"]
    processes = 1
    timeout = 60
    unit = "seconds"

    def setup(self, times, *params):
        seconds, note = times.get(_key(*params), (None, "not timed"))
        if seconds is None:
            raise NotImplementedError(note)

    def track_seconds(self, times, *params):
        return times[_key(*params)][0]

    track_seconds.unit = "seconds"


class Forward(_Grid):
    """Forward pass: ``attention(q, k, v, causal=...)``, (B, H, L, D) inputs."""

    params = [FWD_IMPLS, DTYPES, HEAD_DIMS, CAUSAL, SEQLENS]

    def setup_cache(self):
        return sweep("fwd", FWD_IMPLS)

    setup_cache.timeout = 1500


class Backward(_Grid):
    """Backward pass alone (its forward runs once, untimed); ``cuflash_det`` is
    ``deterministic=True``."""

    params = [BWD_IMPLS, DTYPES, HEAD_DIMS, CAUSAL, SEQLENS]

    def setup_cache(self):
        return sweep("bwd", BWD_IMPLS)

    setup_cache.timeout = 1500


_FIRST_CALL = """
import json, time
import cupy as cp
import cuflash
q, k, v = (cp.ones((1, 16, 1024, 128), dtype=cp.float16) for _ in range(3))
cp.cuda.Device().synchronize()  # CUDA context and inputs outside the timing
t0 = time.perf_counter()
cuflash.attention(q, k, v)
cp.cuda.Device().synchronize()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


class FirstCall:
    """Wall time of the first ``attention`` call (float16, d128) in a fresh process:
    ``cold`` with an empty kernel cache (NVRTC compile, load, run), ``warm_cache`` with
    the compiled kernel already on disk (load, run)."""

    params = [["cold", "warm_cache"]]
    param_names = ["cache"]
    processes = 1
    timeout = 60
    unit = "seconds"

    def setup_cache(self):
        times = {}
        with tempfile.TemporaryDirectory() as cache:
            # The child imports the cuflash that this process imported (asv's runner
            # sets its sys.path, not necessarily PYTHONPATH).
            env = dict(os.environ, CUPY_CACHE_DIR=cache,
                       PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            for name in ("cold", "warm_cache"):
                p = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env,
                                   capture_output=True, text=True, timeout=300)
                if p.returncode:
                    raise RuntimeError(p.stderr[-2000:])
                times[name] = json.loads(p.stdout.strip().splitlines()[-1])["seconds"]
        return times

    setup_cache.timeout = 600

    def track_seconds(self, times, cache):
        return times[cache]

    track_seconds.unit = "seconds"
