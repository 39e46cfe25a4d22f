"""Host time of the CuPy and torch paths, split: preallocated outputs, foreign stream,
adapter wrappers, autograd.Function with and without grad (the perf-log's host-overhead
section).

    PYTHONPATH=. python tools/probe_host_paths.py
"""
import time

import cupy as cp
import torch

import cuflash
import cuflash._api as api
import cuflash._interop as io
import cuflash.torch as ct

B, H, L, D = 8, 8, 1024, 32
q,k,v=(torch.randn(B,H,L,D,device="cuda",dtype=torch.bfloat16,requires_grad=True) for _ in range(3))
qc,kc,vc=(ct._cp(x) for x in (q,k,v))
out,lse=cuflash.attention(qc,kc,vc,causal=True,return_lse=True)
dout=cp.ones_like(out)
dq,dk,dv=(cp.empty_like(x) for x in (qc,kc,vc))
o2=cp.empty_like(out); l2=cp.empty_like(lse)
g=torch.ones(B,H,L,D,device="cuda",dtype=torch.bfloat16)
sv=ct.attention(q.detach(),k.detach(),v.detach(),causal=True,return_lse=True)
ptr=torch.cuda.current_stream().cuda_stream
def t(name, fn, n=400):
    for _ in range(5): fn()
    torch.cuda.synchronize(); t0=time.perf_counter()
    for _ in range(n): fn()
    h=(time.perf_counter()-t0)/n*1e6; torch.cuda.synchronize(); tot=(time.perf_counter()-t0)/n*1e6
    print(f"{name:40s} host {h:7.1f}  total {tot:7.1f} us")
def ons(fn):
    def w():
        with io.on_stream(ptr, 0): fn()
    return w
bwd=lambda: cuflash.attention_backward(dout,qc,kc,vc,out,lse,causal=True)
bwdp=lambda: cuflash.attention_backward(dout,qc,kc,vc,out,lse,causal=True,dq=dq,dk=dk,dv=dv)
fwdp=lambda: api.attention_into(qc,kc,vc,o2,l2,causal=True,scale=D**-0.5)
t("cupy bwd", bwd); t("cupy bwd prealloc", bwdp); t("cupy bwd on_stream", ons(bwd)); t("cupy bwd prealloc on_stream", ons(bwdp))
t("adapter _backward_impl", lambda: ct._backward_impl(g,q,k,v,*sv,True,D**-0.5,False))
t("cupy fwd into", fwdp); t("cupy fwd into on_stream", ons(fwdp))
t("adapter _forward_impl", lambda: ct._forward_impl(q,k,v,True,D**-0.5))
t("Function.apply", lambda: ct._Attention.apply(q,k,v,True,D**-0.5,False))
with torch.no_grad(): t("Function.apply no_grad", lambda: ct._Attention.apply(q,k,v,True,D**-0.5,False))
t("sdpa fwd", lambda: torch.nn.functional.scaled_dot_product_attention(q,k,v,is_causal=True))
print("torch stream ptr", ptr, "cupy null ptr", cp.cuda.Stream.null.ptr)
