"""``python -m cuflash [demo|bench|compile|compile-time]``.

demo (default)  check the forward and backward kernels against the float64 reference,
                then time them next to plain CuPy and torch SDPA; without a GPU, run the
                NumPy path instead.
bench           the standard forward and backward benchmark tables (needs a GPU).
compile         compile every shipped specialisation with NVRTC (no GPU needed) and
                print registers, shared memory and spills.
compile-time    cold NVRTC compile, disk-cache load and in-memory hit of one kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np


def _gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _device_name() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def demo_cpu() -> int:
    import cuflash
    from cuflash import _reference

    print("No CUDA GPU found (or CuPy is not installed): running the NumPy reference path.")
    rng = np.random.default_rng(0)
    B, H, L, D = 1, 4, 256, 64
    q, k, v = (rng.standard_normal((B, H, L, D)).astype(np.float16) for _ in range(3))
    t0 = time.perf_counter()
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dt = time.perf_counter() - t0
    ref, ref_lse = _reference.attention_naive(q, k, v, causal=True)
    err = float(np.abs(out.astype(np.float64) - ref).max())
    print(f"cuflash.attention on NumPy float16 {q.shape}, causal: {dt * 1e3:.1f} ms, "
          f"max |out - float64 naive| = {err:.2e}, "
          f"max |lse - ref| = {float(np.abs(lse - ref_lse).max()):.2e}")
    dout = rng.standard_normal(out.shape).astype(np.float16)
    t0 = time.perf_counter()
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    dt = time.perf_counter() - t0
    ref_grads = _reference.attention_backward_naive(dout, q, k, v, causal=True)
    gerr = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(grads, ref_grads))
    print(f"cuflash.attention_backward on NumPy: {dt * 1e3:.1f} ms, "
          f"max |d(q,k,v) - float64 naive| = {gerr:.2e}")
    ok = err < 1e-2 and gerr < 2e-2
    print("reference check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def demo_gpu() -> int:
    import cupy as cp

    import cuflash
    from cuflash import _bench, _reference

    print(f"device: {_device_name()}  (CuPy {cp.__version__})")
    case = _bench.Case("float16", 64, True, 512, 2, 4)
    q, k, v = _bench.make_inputs(case)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = _reference.attention_naive(q.get(), k.get(), v.get(), causal=True)
    err = float(np.abs(out.get().astype(np.float64) - ref).max())
    err_lse = float(np.abs(lse.get() - ref_lse).max())
    ok = err < 1e-2 and err_lse < 1e-3 and not bool(cp.isnan(out).any())
    print(f"forward vs float64 reference {q.shape} causal: max|out err| = {err:.2e}, "
          f"max|lse err| = {err_lse:.2e}: {'OK' if ok else 'FAILED'}")
    dout = _bench.random_array(q.shape, "float16", cp.random.RandomState(1))
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    ref_grads = _reference.attention_backward_naive(dout.get(), q.get(), k.get(), v.get(),
                                                    causal=True)
    gerr = max(float(np.abs(g.get().astype(np.float64) - r).max())
               for g, r in zip(grads, ref_grads))
    gok = gerr < 2e-2 and not any(bool(cp.isnan(g).any()) for g in grads)
    print(f"backward vs float64 reference: max|d(q,k,v) err| = {gerr:.2e}: "
          f"{'OK' if gok else 'FAILED'}")
    cases = [_bench.Case("float16", 64, False, 2048, 4, 16),
             _bench.Case("float16", 128, True, 4096, 2, 16)]
    cases += [dataclasses.replace(c, direction="bwd") for c in cases]
    rows = _bench.run(cases, progress=False)
    for d in ("fwd", "bwd"):
        print()
        print(_bench.format_table([r for r in rows if r["case"].direction == d]))
    return 0 if ok and gok else 1


def cmd_bench(args) -> int:
    from cuflash import _bench

    if not _gpu():
        print("bench needs CuPy and a CUDA GPU", file=sys.stderr)
        return 2
    seqlens = tuple(int(s) for s in args.seqlens.split(","))
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    directions = args.direction.split(",")
    dtypes = tuple(args.dtypes.split(","))
    cases = [c for d in directions
             for c in _bench.standard_cases(seqlens=seqlens, head_dims=head_dims, direction=d,
                                            dtypes=dtypes)]
    print(f"device: {_device_name()}", file=sys.stderr)
    rows = _bench.run(cases)
    for d in directions:
        for dts, base in ((("bfloat16", "float16"), _bench.FLASH),
                          (("float32",), _bench.EFFICIENT)):  # flash has no float32
            sel = [r for r in rows if r["case"].direction == d and r["case"].dtype in dts]
            if sel:
                print(_bench.format_table(sel, baseline=base))
                print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _device_name(), "rows": _bench.rows_to_records(rows)}, f,
                      indent=1)
    return 0


def cmd_compile(args) -> int:
    from cuflash import _kernels, _nvrtc

    archs = tuple(int(a) for a in args.archs.split(","))
    specs = _kernels.shipped_specs(archs)
    print(f"NVRTC {'.'.join(map(str, _nvrtc.version()))}: {len(specs)} specialisations")
    bad = 0
    for spec in specs:
        r = _nvrtc.compile_spec(spec)
        flag = "SPILL" if r.spills else ""
        bad += r.spills
        print(f"{spec.label}  regs {r.registers:3d}  smem {spec.smem_bytes // 1024:3d} KiB  "
              f"stack {r.stack_bytes:3d}  {r.seconds:5.2f} s  {flag}")
    return 1 if bad else 0


_TIME_ONE = """
import json, time
from cuflash import _dispatch, _kernels
spec = _kernels.fwd_spec("bfloat16", 128, 128, True, True, _dispatch.device_arch())
_dispatch.max_smem_per_block()  # CUDA context and device query outside the timing
t0 = time.perf_counter(); _dispatch.get_kernel(spec); first = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(1000): _dispatch.get_kernel(spec)
hit = (time.perf_counter() - t0) / 1000
print(json.dumps({"label": spec.label, "first": first, "hit": hit}))
from cuflash import _sm90
if _sm90.available(_dispatch.device_arch()):
    spec = _kernels.sm90_fwd_spec("bfloat16", 128, True)
    t0 = time.perf_counter(); _sm90.get_function(spec); first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(1000): _sm90.get_function(spec)
    hit = (time.perf_counter() - t0) / 1000
    print(json.dumps({"label": spec.label, "first": first, "hit": hit}))
"""


def cmd_compile_time(args) -> int:
    """One specialisation, each time in a fresh process: first with an empty CuPy disk
    cache (cold NVRTC compile), then with that cache filled (module load only)."""
    import subprocess

    if not _gpu():
        print("compile-time needs CuPy and a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache)
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", _TIME_ONE], env=env, capture_output=True,
                               text=True, check=True)
            results.append([json.loads(ln) for ln in p.stdout.strip().splitlines()
                            if ln.startswith("{")])
    for cold, warm in zip(*results):  # the portable kernel, then (sm_90) the Hopper one
        print(f"{cold['label']}: cold compile {cold['first'] * 1e3:.0f} ms, "
              f"warm (disk cache) load {warm['first'] * 1e3:.2f} ms, "
              f"in-memory hit {warm['hit'] * 1e6:.1f} us")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cuflash", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("demo", help="check and time on a GPU; NumPy path without one")
    b = sub.add_parser("bench", help="forward benchmark against torch SDPA and CuPy")
    b.add_argument("--seqlens", default="1024,4096,16384")
    b.add_argument("--head-dims", default="64,128")
    b.add_argument("--direction", default="fwd,bwd", help="fwd, bwd or fwd,bwd")
    b.add_argument("--dtypes", default="bfloat16,float16",
                   help="any of bfloat16, float16, float32 (ratios: float32 against torch's "
                        "memory-efficient backend, the others against its flash backend)")
    b.add_argument("--json", help="also write the rows to this JSON file")
    c = sub.add_parser("compile", help="compile every specialisation with NVRTC (no GPU)")
    c.add_argument("--archs", default="80,90")
    sub.add_parser("compile-time", help="cold and warm compile time of one kernel")
    args = p.parse_args(argv)
    if args.cmd == "bench":
        return cmd_bench(args)
    if args.cmd == "compile":
        return cmd_compile(args)
    if args.cmd == "compile-time":
        return cmd_compile_time(args)
    return demo_gpu() if _gpu() else demo_cpu()


if __name__ == "__main__":
    sys.exit(main())
