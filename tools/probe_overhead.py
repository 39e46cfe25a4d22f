"""Host time per attention call (no synchronisation inside the timing), at a size where
the GPU work is small: where the framework adapters spend their time.

    PYTHONPATH=. python tools/probe_overhead.py ["cupy bwd" "torch fwd+bwd" ...]

Each named case is also profiled (cProfile; CuPy's Cython calls count to their caller).
The split cases (preallocated outputs, torch's stream, autograd.Function under no_grad)
were a separate script, tools/probe_host_paths.py of commit 49d7a99, which made
docs/results/host-paths-9a224a0-h200.txt.
"""

import cProfile
import pstats
import sys
import time

import cupy as cp
import torch
import torch.nn.functional as F

import cuflash
import cuflash._api as api
import cuflash._interop as io
import cuflash.torch as ct


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / n
    return host * 1e6, total * 1e6


def main() -> int:
    B, H, L, D = 8, 8, 1024, 32
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    qc, kc, vc = (ct._cp(x) for x in (q, k, v))
    out, lse = cuflash.attention(qc, kc, vc, causal=True, return_lse=True)
    dout = cp.ones_like(out)
    g = torch.ones(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    saved = ct.attention(q.detach(), k.detach(), v.detach(), causal=True, return_lse=True)
    dq, dk, dv = (cp.empty_like(x) for x in (qc, kc, vc))
    out_into, lse_into = cp.empty_like(out), cp.empty_like(lse)
    stream = torch.cuda.current_stream().cuda_stream

    def on_torch_stream(fn):
        def run():
            with io.on_stream(stream, 0):
                fn()
        return run

    def bwd_prealloc():
        cuflash.attention_backward(dout, qc, kc, vc, out, lse, causal=True, dq=dq, dk=dk, dv=dv)

    def fwd_into():
        api.attention_into(qc, kc, vc, out_into, lse_into, causal=True, scale=D ** -0.5)

    def function_no_grad():
        with torch.no_grad():
            ct._Attention.apply(q, k, v, True, D ** -0.5, False)

    cases = {
        "cupy fwd": lambda: cuflash.attention(qc, kc, vc, causal=True),
        "cupy bwd": lambda: cuflash.attention_backward(dout, qc, kc, vc, out, lse, causal=True),
        "torch fwd (no grad)": lambda: ct.attention(q.detach(), k.detach(), v.detach(),
                                                    causal=True),
        "torch fwd+bwd": lambda: torch.autograd.grad(ct.attention(q, k, v, causal=True),
                                                     (q, k, v), g),
        "torch op fwd+bwd": lambda: torch.autograd.grad(
            torch.ops.cuflash.attention_fwd(q, k, v, True, D ** -0.5, False)[0], (q, k, v), g),
        "torch fwd (grad)": lambda: ct.attention(q, k, v, causal=True),
        "torch bwd impl, main": lambda: ct._backward_impl(g, q, k, v, *saved, True, D ** -0.5,
                                                          False),
        "cupy bwd prealloc": bwd_prealloc,
        "cupy bwd prealloc, torch stream": on_torch_stream(bwd_prealloc),
        "cupy fwd into": fwd_into,
        "cupy fwd into, torch stream": on_torch_stream(fwd_into),
        "torch fwd impl": lambda: ct._forward_impl(q, k, v, True, D ** -0.5),
        "Function.apply": lambda: ct._Attention.apply(q, k, v, True, D ** -0.5, False),
        "Function.apply no_grad": function_no_grad,
        "sdpa fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa fwd+bwd": lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g),
    }
    print(f"(B, H, L, D) = {(B, H, L, D)} bf16 causal; microseconds per call")
    print(f"{'case':32s} {'host':>8s} {'host+gpu':>9s}")
    for name, fn in cases.items():
        h, t = host_us(fn)
        print(f"{name:32s} {h:8.1f} {t:9.1f}")
    for name in sys.argv[1:]:  # profile these cases
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            cases[name]()
        prof.disable()
        torch.cuda.synchronize()
        print(f"---- profile of 100 calls: {name}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
