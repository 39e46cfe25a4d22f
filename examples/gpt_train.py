"""Train a small GPT for 100 steps with torch SDPA, then again with cuflash, from the same
seed; print both loss curves and the step times.

    PYTHONPATH=. python examples/gpt_train.py [--steps 100] [--check-hf]

The model: 4 layers, width 256, 8 heads (head dim 32), seqlen 1024, batch 8, random
tokens over a 4096-word vocabulary, AdamW, bf16 autocast. Only the attention call differs
between the two runs: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` or
``cuflash.torch.attention(q, k, v, causal=True)``, both on ``(B, H, L, D)`` views of the
``(B, L, 3, H, D)`` projection (no copies). With ``--check-hf`` (transformers installed),
cuflash is also registered as a transformers attention implementation and one forward and
backward of a random Llama is compared with transformers' SDPA.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import cuflash.torch


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def cuflash_attention(q, k, v):
    return cuflash.torch.attention(q, k, v, causal=True)


ATTENTION = {"sdpa": sdpa_attention, "cuflash": cuflash_attention}
HF_NAME = "cufa"  # cuflash's name in transformers' attention registry


class Block(nn.Module):
    def __init__(self, width, heads, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        B, L, W = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, W // self.heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views
        y = self.attention(q, k, v).transpose(1, 2).reshape(B, L, W)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, attention, vocab=4096, width=256, heads=8, layers=4, seqlen=1024):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seqlen, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, attention) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def train(attention: str, steps=100, seed=0, batch=8, seqlen=1024, vocab=4096,
          device="cuda"):
    """Losses of each step and the median step time (s) of steps after the 10th."""
    torch.manual_seed(seed)
    model = GPT(ATTENTION[attention], vocab=vocab, seqlen=seqlen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    losses, times = [], []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seqlen + 1), device=device, generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    later = sorted(times[10:]) or times
    return losses, later[len(later) // 2]


def compare(steps=100, seed=0):
    """Both runs; returns (sdpa losses, cuflash losses, sdpa step s, cuflash step s)."""
    ref, t_ref = train("sdpa", steps, seed)
    ours, t_ours = train("cuflash", steps, seed)
    return ref, ours, t_ref, t_ours


def hf_check(seed=0):
    """Register cuflash with transformers' attention interface; compare one forward and
    backward of a random Llama (GQA 8:2) against transformers' SDPA. Returns the max
    abs differences of the logits and of the gradients, and the same for SDPA vs eager
    (the spread between two exact implementations at this precision)."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    try:  # no attention mask is built for cuflash: causal comes from the module
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(HF_NAME, lambda *args, **kwargs: None)
    except ImportError:  # pragma: no cover - transformers before masking_utils
        pass

    def cuflash_hf(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("cuflash: padding masks need attention_varlen")
        if dropout:
            raise NotImplementedError("cuflash: dropout is not supported yet")
        out = cuflash.torch.attention(query, key, value, causal=module.is_causal,
                                      scale=scaling)
        return out.transpose(1, 2), None  # transformers wants (B, L, H, D)

    # transformers reads a name containing "flash" as a flash-attn kernel to import
    AttentionInterface.register(HF_NAME, cuflash_hf)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    tokens = torch.randint(0, 1000, (2, 256), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(seed))
    results = {}
    for impl in ("eager", "sdpa", HF_NAME):
        torch.manual_seed(seed)
        config._attn_implementation = impl
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        model.config._attn_implementation = impl
        logits = model(tokens).logits
        logits.float().square().mean().backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results[impl] = (logits.float(), grads)

    def diff(a, b):
        return ((results[a][0] - results[b][0]).abs().max().item(),
                (results[a][1] - results[b][1]).abs().max().item())

    return diff(HF_NAME, "sdpa"), diff("eager", "sdpa")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-hf", action="store_true")
    args = p.parse_args(argv)
    ref, ours, t_ref, t_ours = compare(args.steps, args.seed)
    print(f"{'step':>5s} {'sdpa loss':>10s} {'cuflash loss':>13s} {'diff':>9s}")
    for i in list(range(0, args.steps, 10)) + [args.steps - 1]:
        print(f"{i:5d} {ref[i]:10.4f} {ours[i]:13.4f} {ours[i] - ref[i]:9.4f}")
    worst = max(abs(a - b) for a, b in zip(ref, ours))
    print(f"max |loss diff| over {args.steps} steps: {worst:.4f} "
          f"(initial loss {ref[0]:.3f}, ln(vocab) = {math.log(4096):.3f})")
    print(f"median step: sdpa {t_ref * 1e3:.2f} ms, cuflash {t_ours * 1e3:.2f} ms, "
          f"ratio sdpa/cuflash {t_ref / t_ours:.3f}")
    if args.check_hf:
        (dl, dg), (el, eg) = hf_check(args.seed)
        print(f"transformers Llama, cuflash vs sdpa: max|logits diff| {dl:.3g}, "
              f"max|grad diff| {dg:.3g} (eager vs sdpa: {el:.3g}, {eg:.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
