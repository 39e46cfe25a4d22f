"""Side-by-side timing of cuflash and the attention a user would pick instead, forward
and backward.

Peers: PyTorch ``scaled_dot_product_attention`` with its flash backend (FlashAttention-2)
and its cuDNN backend, when torch is importable, and plain CuPy (matmul, softmax,
matmul). Every implementation reads the same device buffers (shared through DLPack).
Times are medians of CUDA-event-timed rounds after a warm-up, on random data. A
backward case times the backward pass alone (its forward runs once, untimed), and
counts 2.5 times the forward FLOPs, as FlashAttention's benchmarks do.

The default peers use only cuflash's public API and absolute imports, so the asv suite
(``asv_bench/``) can load this file by path and time an older cuflash checkout with it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np

FLASH = "torch_flash"
CUDNN = "torch_cudnn"
EFFICIENT = "torch_efficient"
CUPY = "cupy_naive"
CUFLASH = "cuflash"
CUFLASH_DET = "cuflash_det"
CUFLASH_MMA = "cuflash_mma"  # the portable kernels where an sm_90a one would run


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    head_dim: int
    causal: bool
    seqlen: int
    batch: int
    heads: int
    direction: str = "fwd"  # or "bwd"

    @property
    def flops(self) -> float:
        f = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        f = f * 2.5 if self.direction == "bwd" else f
        return f / 2 if self.causal else f

    @property
    def label(self) -> str:
        return (f"{self.direction} {self.dtype:8s} d{self.head_dim:<3d} "
                f"{'causal' if self.causal else 'full  '} "
                f"L{self.seqlen:<5d} b{self.batch:<2d} h{self.heads}")


def standard_cases(seqlens=(1024, 4096, 16384), head_dims=(64, 128),
                   dtypes=("bfloat16", "float16"), tokens=16384,
                   direction="fwd") -> list[Case]:
    """The issue's grid: batch * seqlen = tokens, heads = 2048 / head_dim."""
    return [Case(dt, d, c, L, max(1, tokens // L), 2048 // d, direction)
            for dt in dtypes for d in head_dims for c in (False, True) for L in seqlens]


class Skip(Exception):
    """This implementation does not run this case (missing package, memory, backend)."""


def _cupy():
    import cupy

    return cupy


def random_array(shape, dtype: str, rs):
    """Standard-normal values rounded to float16 or bfloat16 (or float32), as a CuPy array."""
    cp = _cupy()
    x = rs.standard_normal(shape, dtype=cp.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(cp.float16)
    import ml_dtypes

    u = x.view(cp.uint32)
    u = (u + (cp.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16  # round to nearest even
    return u.astype(cp.uint16).view(np.dtype(ml_dtypes.bfloat16))


def make_inputs(case: Case, seed: int = 0):
    """Random q, k, v as CuPy arrays (B, H, L, D) of the case's dtype."""
    rs = _cupy().random.RandomState(seed)
    shape = (case.batch, case.heads, case.seqlen, case.head_dim)
    return [random_array(shape, case.dtype, rs) for _ in range(3)]


def _to_torch(x):
    import torch

    if x.dtype in (np.float16, np.float32):
        return torch.from_dlpack(x)
    return torch.from_dlpack(x.view(_cupy().uint16)).view(torch.bfloat16)


def impl_cuflash(q, k, v, causal, spec=None):
    import cuflash

    if spec is None:
        return lambda: cuflash.attention(q, k, v, causal=causal)
    from cuflash import _dispatch

    cp = _cupy()
    out = cp.empty_like(q)
    lse = cp.empty(q.shape[:-1], dtype=cp.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return lambda: _dispatch.forward(q, k, v, out, lse, causal=causal, scale=scale, spec=spec)


def _portable(make):
    """``make``'s callable run on cuflash's portable mma.sync kernels, also on Hopper (where
    the dispatcher would pick an sm_90a kernel): the two families side by side. Skipped
    elsewhere."""
    def factory(q, k, v, causal):
        try:
            from cuflash import _sm90
        except ImportError as e:  # an older tree (asv history)
            raise Skip("no sm_90a kernels in this tree") from e
        if not _sm90.available(int(_cupy().cuda.Device().compute_capability)):
            raise Skip("no sm_90a kernels on this device")
        with _sm90.disabled():
            fn = make(q, k, v, causal)

        def run():
            with _sm90.disabled():
                return fn()

        return run

    return factory


def _torch_sdpa(backend_name, backward=False):
    """Factory for torch SDPA with one backend: the forward call, or (backward) the
    backward pass alone, from one forward run outside the timed function."""

    def make(q, k, v, causal):
        try:
            import torch
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as e:
            raise Skip("torch not importable") from e
        backend = getattr(SDPBackend, backend_name)
        tq, tk, tv = (_to_torch(x).detach().requires_grad_(backward) for x in (q, k, v))

        def forward():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv,
                                                                        is_causal=causal)

        try:
            run = forward
            if backward:
                out, tdo = forward(), _to_torch(_dout_like(q))

                def run():
                    return torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True)

            run()
            torch.cuda.synchronize()
        except RuntimeError as e:
            raise Skip(f"{backend_name} backend refused: {str(e).splitlines()[0][:80]}") from e
        return run

    return make


def _naive_setup(q, k, causal, score_matrices, max_bytes):
    """Checks for the plain CuPy peers (float16 and float32, score matrices that fit) and
    their scale and causal mask (None when not causal)."""
    cp = _cupy()
    B, H, L, D = q.shape
    Lk = k.shape[-2]
    if B * H * L * Lk * 4 * score_matrices > max_bytes:
        raise Skip("score matrix too large")
    if q.dtype not in (np.float16, np.float32):
        raise Skip("CuPy matmul has no bfloat16")
    mask = cp.arange(Lk)[None, :] > cp.arange(L)[:, None] + Lk - L if causal else None
    return 1.0 / math.sqrt(D), mask


def _naive_softmax(q, k, scale, mask):
    """softmax(scale * q k^T) in float32, masked entries 0."""
    cp = _cupy()
    s = cp.matmul(q, k.swapaxes(-1, -2)).astype(cp.float32) * scale
    if mask is not None:
        s[..., mask] = -cp.inf
    s -= s.max(axis=-1, keepdims=True)
    p = cp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def impl_cupy_naive(q, k, v, causal, max_bytes=8 << 30):
    """What a CuPy user writes by hand: matmul, softmax in float32, matmul."""
    scale, mask = _naive_setup(q, k, causal, 3, max_bytes)
    return lambda: _cupy().matmul(_naive_softmax(q, k, scale, mask).astype(q.dtype), v)


# ----------------------------------------------------------------------------- backward


def _dout_like(q):
    return random_array(q.shape, np.dtype(q.dtype).name, _cupy().random.RandomState(1))


def impl_cuflash_bwd(q, k, v, causal, *, deterministic=False, spec=None, dq_spec=None):
    import cuflash

    if not hasattr(cuflash, "attention_backward"):
        raise Skip("this cuflash has no backward")
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    dout = _dout_like(q)
    if spec is None and dq_spec is None:
        return lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                  deterministic=deterministic)
    from cuflash import _dispatch

    cp = _cupy()
    grads = [cp.empty_like(x) for x in (q, k, v)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    det = deterministic if spec is None else not spec.atomic_dq
    return lambda: _dispatch.backward(dout, q, k, v, out, lse, *grads, causal=causal,
                                      scale=scale, deterministic=det, main_spec=spec,
                                      dq_spec=dq_spec)


def impl_cuflash_bwd_det(q, k, v, causal):
    return impl_cuflash_bwd(q, k, v, causal, deterministic=True)


def impl_cupy_naive_bwd(q, k, v, causal, max_bytes=8 << 30):
    """The hand-written backward of impl_cupy_naive, from its saved probabilities."""
    cp = _cupy()
    scale, mask = _naive_setup(q, k, causal, 4, max_bytes)
    p = _naive_softmax(q, k, scale, mask).astype(q.dtype)
    dout = _dout_like(q)

    def run():
        dv = cp.matmul(p.swapaxes(-1, -2), dout)
        dp = cp.matmul(dout, v.swapaxes(-1, -2)).astype(cp.float32)
        dp -= (dp * p).sum(axis=-1, keepdims=True)
        ds = (dp * p).astype(q.dtype)
        dq = cp.matmul(ds, k) * scale
        dk = cp.matmul(ds.swapaxes(-1, -2), q) * scale
        return dq, dk, dv

    return run


PEERS = {
    CUFLASH: impl_cuflash,
    CUFLASH_MMA: _portable(impl_cuflash),
    FLASH: _torch_sdpa("FLASH_ATTENTION"),
    CUDNN: _torch_sdpa("CUDNN_ATTENTION"),
    EFFICIENT: _torch_sdpa("EFFICIENT_ATTENTION"),
    CUPY: impl_cupy_naive,
}

PEERS_BWD = {
    CUFLASH: impl_cuflash_bwd,
    CUFLASH_MMA: _portable(impl_cuflash_bwd),
    CUFLASH_DET: impl_cuflash_bwd_det,
    FLASH: _torch_sdpa("FLASH_ATTENTION", backward=True),
    CUDNN: _torch_sdpa("CUDNN_ATTENTION", backward=True),
    EFFICIENT: _torch_sdpa("EFFICIENT_ATTENTION", backward=True),
    CUPY: impl_cupy_naive_bwd,
}


def time_fn(fn, *, warmup_ms=50.0, rounds=7, min_round_ms=40.0) -> float:
    """Median milliseconds per call, from CUDA events around rounds of calls."""
    cp = _cupy()
    fn()
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    n = 0
    while (time.perf_counter() - t0) * 1e3 < warmup_ms or n < 2:
        fn()
        n += 1
        cp.cuda.runtime.deviceSynchronize()
    per_call = max((time.perf_counter() - t0) * 1e3 / n, 1e-3)
    reps = max(1, int(min_round_ms / per_call))
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / reps)
    return float(np.median(times))


def run(cases, impls=None, *, progress=True, extra=None, timing=None):
    """Time every implementation on every case; returns one dict per (case, impl).

    ``extra`` maps more names to factories ``(q, k, v, causal) -> callable`` (tile sweeps);
    ``timing`` holds keyword arguments for :func:`time_fn`.
    """
    def peers(case):
        table = PEERS_BWD if case.direction == "bwd" else PEERS
        chosen = dict(table if impls is None else {n: table[n] for n in impls if n in table})
        chosen.update(extra or {})
        return chosen

    rows = []
    total = sum(len(peers(c)) for c in cases)
    done = 0
    for case in cases:
        q, k, v = make_inputs(case)
        for name, make in peers(case).items():
            done += 1
            row = {"case": case, "impl": name, "ms": None, "tflops": None, "note": ""}
            try:
                fn = make(q, k, v, case.causal)
                ms = time_fn(fn, **(timing or {}))
                row.update(ms=ms, tflops=case.flops / ms / 1e9)
            except Skip as e:
                row["note"] = str(e)
            except Exception as e:  # a failing peer must not stop the table
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows.append(row)
            if progress:
                t = f"{row['tflops']:7.1f} TFLOP/s" if row["tflops"] else row["note"][:40]
                print(f"[{done:3d}/{total}] {case.label}  {name:14s} {t}", file=sys.stderr,
                      flush=True)
        del q, k, v
        _cupy().get_default_memory_pool().free_all_blocks()
    return rows


def format_table(rows, baseline=FLASH, ours=CUFLASH) -> str:
    """One line per case: TFLOP/s of each implementation, and ratios of ours (and of the
    deterministic variant, when present) over the baseline."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ratios = [(n, baseline) for n in (ours, CUFLASH_DET, CUFLASH_MMA) if n in impls]
    if CUDNN in impls and ours in impls and baseline != CUDNN:
        ratios.append((ours, CUDNN))
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    head = f"{'case':44s} " + " ".join(f"{n:>12s}" for n in impls)
    head += "".join(f" {a + '/' + b:>24s}" for a, b in ratios)
    lines = [head, "-" * len(head)]
    for case, rs in by_case.items():
        cells = []
        for n in impls:
            r = rs.get(n)
            cells.append(f"{r['tflops']:12.1f}" if r and r["tflops"] else f"{'-':>12s}")
        line = f"{case.label:44s} " + " ".join(cells)
        for a_name, b_name in ratios:
            a, b = rs.get(a_name), rs.get(b_name)
            ok = a and b and a["tflops"] and b["tflops"]
            line += f" {a['tflops'] / b['tflops']:24.2f}" if ok else f" {'-':>24s}"
        lines.append(line)
    return "\n".join(lines)


def rows_to_records(rows):
    """Plain dicts (for JSON)."""
    out = []
    for r in rows:
        c = r["case"]
        out.append({**dataclasses.asdict(c), "impl": r["impl"], "ms": r["ms"],
                    "tflops": r["tflops"], "note": r["note"]})
    return out
