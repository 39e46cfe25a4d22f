"""What the options cost (issue 7's benchmark), on the GPU, side by side in one run.

    PYTHONPATH=. python3 tools/bench_options.py [--flex] [--json FILE] [--sections 1,2,2b,3]

Three tables, bf16, d = 128, CUDA-event medians (cuflash._bench.time_fn):
  1. overhead at L = 4096 (B=4, H=16), forward and backward: each option against the
     plain kernel, time ratio (a window that hides nothing, (L, L), measures the windowed
     mask's cost; (1024, 0) is also listed with its speed-up);
  2. a 1k sliding window against full causal at L = 16384 (B=1, H=16): time ratio;
  2b. packed sequences (attention_varlen, 4 x 4096) against the fixed batch;
  3. GQA 8:1 (Hk = 2) against MHA (Hk = 16) at equal FLOPs, L = 4096.
Peers: torch SDPA's flash backend for causal and GQA (enable_gqa), and, with --flex,
torch's FlexAttention (compiled) for window, softcap and ALiBi, which SDPA's flash
backend does not run.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from cuflash import _bench

D = 128


def inputs(b, hq, hk, lq, lk, seed=0):
    rs = _bench._cupy().random.RandomState(seed)
    return (_bench.random_array((b, hq, lq, D), "bfloat16", rs),
            _bench.random_array((b, hk, lk, D), "bfloat16", rs),
            _bench.random_array((b, hk, lk, D), "bfloat16", rs))


def slopes_for(cp, h):
    return cp.asarray(2.0 ** (-8.0 * np.arange(1, h + 1) / h), dtype=cp.float32)


def cuflash_fns(q, k, v, causal, opts):
    """(forward, backward-only) callables for cuflash with these options."""
    import cuflash

    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **opts)
    dout = _bench._dout_like(q)

    def fwd():
        return cuflash.attention(q, k, v, causal=causal, **opts)

    def bwd():
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, **opts)

    return fwd, bwd


def varlen_fns(q, k, v, cu, max_len, causal, kernels_only=False):
    """(forward, backward-only) callables for cuflash.attention_varlen; kernels_only calls
    the dispatcher directly, without the API's host check of cu_seqlens (a copy to the
    host, which waits for the GPU on every call)."""
    import cuflash
    from cuflash import _dispatch, _options, _varlen

    out, lse = cuflash.attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal,
                                        return_lse=True)
    dout = _bench._dout_like(q)
    if not kernels_only:
        def fwd():
            return cuflash.attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal)

        def bwd():
            return cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, max_len,
                                                     max_len, causal=causal)

        return fwd, bwd
    cp = _bench._cupy()
    packed = _dispatch.Packed(cu, cu, cu.shape[0] - 1, max_len, max_len)
    opts = _options.Options((-1, 0) if causal else (-1, -1))
    h = _varlen._heads_first
    o2, l2 = cp.empty_like(out), cp.empty_like(lse)
    grads = [cp.empty_like(x) for x in (q, k, v)]
    scale = 1 / D ** 0.5

    def fwd_k():
        _dispatch.forward(h(q), h(k), h(v), h(o2), l2[None], causal=causal, scale=scale,
                          options=opts, packed=packed)

    def bwd_k():
        _dispatch.backward(h(dout), h(q), h(k), h(v), h(out), lse[None],
                           *(h(g) for g in grads), causal=causal, scale=scale,
                           deterministic=False, options=opts, packed=packed)

    return fwd_k, bwd_k


def sdpa_fns(q, k, v, causal, dropout_p=0.0):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv = (_bench._to_torch(x).detach().requires_grad_(True) for x in (q, k, v))
    gqa = tq.shape[1] != tk.shape[1]

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, is_causal=causal, enable_gqa=gqa, dropout_p=dropout_p)

    out = fwd()
    tdo = _bench._to_torch(_bench._dout_like(q))

    def bwd():
        return torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True)

    return fwd, bwd


def flex_fns(q, k, v, causal, opts):
    """torch FlexAttention (torch.compile'd) with the same mask and score changes."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tq, tk, tv = (_bench._to_torch(x).detach().requires_grad_(True) for x in (q, k, v))
    L, Lk = tq.shape[-2], tk.shape[-2]
    off = Lk - L
    left, right = opts.get("window", (-1, -1))
    if causal:
        right = 0 if right < 0 else min(right, 0)
    cap = opts.get("softcap", 0.0)
    slopes = opts.get("alibi_slopes")
    tslopes = None if slopes is None else torch.tensor(slopes.get(), device="cuda")

    def mask_mod(b, h, i, j):
        ok = j >= 0
        if right >= 0:
            ok = ok & (j <= i + off + right)
        if left >= 0:
            ok = ok & (j >= i + off - left)
        return ok

    def score_mod(s, b, h, i, j):
        if cap:
            s = cap * torch.tanh(s / cap)
        if tslopes is not None:
            s = s - tslopes[h] * (i + off - j).abs()
        return s

    block_mask = None
    if left >= 0 or right >= 0:
        block_mask = create_block_mask(mask_mod, None, None, L, Lk, device="cuda")
    torch._functorch.config.donated_buffer = False  # the timed backward retains its graph
    compiled = torch.compile(flex_attention)
    mods = {"score_mod": score_mod} if (cap or tslopes is not None) else {}

    def fwd():
        return compiled(tq, tk, tv, block_mask=block_mask, **mods)

    out = fwd()
    tdo = _bench._to_torch(_bench._dout_like(q))

    def bwd():
        return torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True)

    bwd()
    return fwd, bwd


def timed(make, label, rows, **meta):
    try:
        fwd, bwd = make()
        res = {"fwd_ms": _bench.time_fn(fwd), "bwd_ms": _bench.time_fn(bwd)}
    except Exception as e:  # a refusing peer must not stop the run
        res = {"fwd_ms": None, "bwd_ms": None, "note": f"{type(e).__name__}: {str(e)[:80]}"}
    row = {"label": label, **meta, **res}
    rows.append(row)
    f = lambda x: f"{x:8.3f}" if x else "     n/a"  # noqa: E731
    print(f"  {label:44s} fwd {f(row['fwd_ms'])} ms  bwd {f(row['bwd_ms'])} ms "
          f"{row.get('note', '')}", file=sys.stderr, flush=True)
    return row


def ratio(a, b, key):
    return a[key] / b[key] if a.get(key) and b.get(key) else float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--flex", action="store_true", help="also time torch FlexAttention")
    p.add_argument("--json", help="write every timing here")
    p.add_argument("--sections", default="1,2,2b,3",
                   help="which tables: 1 option costs, 2 window, 2b packed, 3 GQA")
    a = p.parse_args()
    sections = a.sections.split(",")
    cp = _bench._cupy()
    rows: list = []
    lines = []

    if "1" in sections:
        # 1. overhead of each option at L = 4096
        L, B, H = 4096, 4, 16
        q, k, v = inputs(B, H, H, L, L)
        sl = slopes_for(cp, H)
        variants = [
            ("plain", False, {}),
            ("window (L, L): mask only", False, {"window": (L, L)}),
            ("softcap 30", False, {"softcap": 30.0}),
            ("alibi", False, {"alibi_slopes": sl}),
            ("softcap + alibi + window (L, L)", False,
             {"softcap": 30.0, "alibi_slopes": sl, "window": (L, L)}),
            ("causal", True, {}),
            ("causal + softcap 30", True, {"softcap": 30.0}),
            ("causal + alibi", True, {"alibi_slopes": sl}),
            ("window (1024, 0)", False, {"window": (1024, 0)}),
            ("dropout 0.1", False, {"dropout_p": 0.1, "seed": 1}),
            ("causal + dropout 0.1", True, {"dropout_p": 0.1, "seed": 1}),
        ]
        print("overhead at L = 4096, bf16 d128, B=4 H=16", file=sys.stderr)
        base = {}
        for name, causal, opts in variants:
            r = timed(lambda: cuflash_fns(q, k, v, causal, opts), name, rows, table="overhead",
                      impl="cuflash", causal=causal)
            base.setdefault(causal, r)
        if a.flex:
            for name, causal, opts in variants[2:5] + variants[8:9]:
                timed(lambda: flex_fns(q, k, v, causal, opts), name, rows, table="overhead",
                      impl="flex", causal=causal)
        timed(lambda: sdpa_fns(q, k, v, False), "plain", rows, table="overhead",
              impl="torch_flash", causal=False)
        timed(lambda: sdpa_fns(q, k, v, True), "causal", rows, table="overhead",
              impl="torch_flash", causal=True)
        timed(lambda: sdpa_fns(q, k, v, False, 0.1), "dropout 0.1", rows, table="overhead",
              impl="torch_flash", causal=False)
        timed(lambda: sdpa_fns(q, k, v, True, 0.1), "causal + dropout 0.1", rows, table="overhead",
              impl="torch_flash", causal=True)
        lines.append("1. option cost, bf16 d128 L=4096 B=4 H=16 (time / plain kernel's time, same "
                     "causal setting)")
        lines.append(f"   {'variant':36s} {'impl':12s} {'fwd ms':>8s} {'bwd ms':>8s} "
                     f"{'fwd x':>6s} {'bwd x':>6s}")
        for r in (r for r in rows if r["table"] == "overhead"):
            b = base[r["causal"]]
            fx, bx = ratio(r, b, "fwd_ms"), ratio(r, b, "bwd_ms")
            fm = f"{r['fwd_ms']:8.3f}" if r["fwd_ms"] else "     n/a"
            bm = f"{r['bwd_ms']:8.3f}" if r["bwd_ms"] else "     n/a"
            lines.append(f"   {r['label']:36s} {r['impl']:12s} {fm} {bm} {fx:6.2f} {bx:6.2f}")
        torch_rows = {(r["label"]): r for r in rows
                      if r["table"] == "overhead" and r["impl"] == "torch_flash"}
        for plain, drop in (("plain", "dropout 0.1"), ("causal", "causal + dropout 0.1")):
            if plain in torch_rows and drop in torch_rows:
                a_, b_ = torch_rows[drop], torch_rows[plain]
                lines.append(f"   torch flash's own dropout cost ({drop} / {plain}): "
                             f"fwd {ratio(a_, b_, 'fwd_ms'):.2f}x bwd {ratio(a_, b_, 'bwd_ms'):.2f}x")
        q = k = v = None
        cp.get_default_memory_pool().free_all_blocks()

    if "2" in sections:
        # 2. sliding window 1k vs full causal at L = 16384
        L, B, H = 16384, 1, 16
        q, k, v = inputs(B, H, H, L, L)
        print("window 1k vs causal at L = 16384", file=sys.stderr)
        causal = timed(lambda: cuflash_fns(q, k, v, True, {}), "causal", rows, table="window",
                       impl="cuflash")
        win = timed(lambda: cuflash_fns(q, k, v, True, {"window": (1024, -1)}), "window (1024, 0)",
                    rows, table="window", impl="cuflash")
        sd = timed(lambda: sdpa_fns(q, k, v, True), "causal", rows, table="window",
                   impl="torch_flash")
        flex = None
        if a.flex:
            flex = timed(lambda: flex_fns(q, k, v, True, {"window": (1024, -1)}), "window (1024, 0)",
                         rows, table="window", impl="flex")
        lines.append("2. sliding window (1024, 0) vs full causal, bf16 d128 L=16384 B=1 H=16")
        lines.append(f"   cuflash causal {causal['fwd_ms']:.3f} / {causal['bwd_ms']:.3f} ms, window "
                     f"{win['fwd_ms']:.3f} / {win['bwd_ms']:.3f} ms (fwd / bwd): speed-up "
                     f"{ratio(causal, win, 'fwd_ms'):.2f}x / {ratio(causal, win, 'bwd_ms'):.2f}x "
                     f"(work ratio {L * (L + 1) / 2 / (L * 1025 - 1024 * 1025 / 2):.2f}x)")
        lines.append(f"   torch flash causal {sd['fwd_ms'] or float('nan'):.3f} / "
                     f"{sd['bwd_ms'] or float('nan'):.3f} ms"
                     + (f"; flex window {flex['fwd_ms'] or float('nan'):.3f} / "
                        f"{flex['bwd_ms'] or float('nan'):.3f} ms" if flex else ""))
        q = k = v = None
        cp.get_default_memory_pool().free_all_blocks()

    if "2b" in sections:
        # 2b. packed sequences: 4 x 4096 packed against the fixed batch (4, 16, 4096, 128)
        L, B, H = 4096, 4, 16
        q, k, v = inputs(B, H, H, L, L)
        pq, pk, pv = (x.transpose(0, 2, 1, 3).reshape(B * L, H, D) for x in (q, k, v))
        cu = cp.arange(0, B * L + 1, L, dtype=cp.int32)
        print("packed 4 x 4096 vs fixed (4, 16, 4096)", file=sys.stderr)
        lines.append("2b. packed sequences (varlen, 4 x 4096) vs the fixed batch, bf16 d128 H=16 "
                     "(time / fixed time)")
        for causal in (False, True):
            fixed = timed(lambda: cuflash_fns(q, k, v, causal, {}), f"fixed causal={causal}",
                          rows, table="varlen", impl="cuflash")
            pack = timed(lambda: varlen_fns(pq, pk, pv, cu, L, causal), f"packed causal={causal}",
                         rows, table="varlen", impl="cuflash")
            kern = timed(lambda: varlen_fns(pq, pk, pv, cu, L, causal, kernels_only=True),
                         f"packed kernels causal={causal}", rows, table="varlen", impl="cuflash")
            lines.append(f"   causal={causal!s:5s} fixed {fixed['fwd_ms']:.3f} / {fixed['bwd_ms']:.3f} ms,"
                         f" packed {pack['fwd_ms']:.3f} / {pack['bwd_ms']:.3f} ms "
                         f"({ratio(pack, fixed, 'fwd_ms'):.3f}x / {ratio(pack, fixed, 'bwd_ms'):.3f}x;"
                         f" with the host check of cu_seqlens), kernels alone "
                         f"{kern['fwd_ms']:.3f} / {kern['bwd_ms']:.3f} ms "
                         f"({ratio(kern, fixed, 'fwd_ms'):.3f}x / {ratio(kern, fixed, 'bwd_ms'):.3f}x)")
        q = k = v = pq = pk = pv = None
        cp.get_default_memory_pool().free_all_blocks()

    if "3" in sections:
        # 3. GQA 8:1 vs MHA at equal FLOPs
        L, B, H = 4096, 4, 16
        print("GQA 8:1 vs MHA at L = 4096", file=sys.stderr)
        lines.append("3. GQA 8:1 (Hk=2) vs MHA (Hk=16), bf16 d128 L=4096 B=4 Hq=16 (time / MHA's)")
        for causal in (False, True):
            got = {}
            for hk in (16, 2):
                q, k, v = inputs(B, H, hk, L, L)
                got[("cuflash", hk)] = timed(lambda: cuflash_fns(q, k, v, causal, {}),
                                             f"hk={hk} causal={causal}", rows, table="gqa",
                                             impl="cuflash", causal=causal)
                got[("torch_flash", hk)] = timed(lambda: sdpa_fns(q, k, v, causal),
                                                 f"hk={hk} causal={causal}", rows, table="gqa",
                                                 impl="torch_flash", causal=causal)
            for impl in ("cuflash", "torch_flash"):
                m, g = got[(impl, 16)], got[(impl, 2)]
                lines.append(f"   {impl:12s} causal={causal!s:5s} fwd {ratio(g, m, 'fwd_ms'):.3f}x  "
                             f"bwd {ratio(g, m, 'bwd_ms'):.3f}x")
            q = k = v = None
            cp.get_default_memory_pool().free_all_blocks()

    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
