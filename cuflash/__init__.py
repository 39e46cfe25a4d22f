"""cuflash: FlashAttention for CuPy.

Fused, exact attention kernels written in CUDA C++ and compiled at run time by NVRTC
(through CuPy), with a NumPy reference path that runs the same call on any CPU.

>>> import cuflash
>>> out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)   # doctest: +SKIP
>>> dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)  # doctest: +SKIP

Packed sequences of different lengths: ``cuflash.attention_varlen`` and
``cuflash.attention_varlen_backward``. Options: ``window``, ``softcap``, ``alibi_slopes``,
``dropout_p`` with ``seed`` (docs/options.md); ``cuflash.dropout_mask`` shows a dropout mask.

Framework adapters, differentiable and zero-copy: ``cuflash.torch.attention`` and
``cuflash.jax.attention`` (docs/interop.md).
"""

from ._api import attention, attention_backward
from ._dropout import dropout_mask
from ._varlen import attention_varlen, attention_varlen_backward

__version__ = "0.1.0"
__all__ = ["attention", "attention_backward", "attention_varlen", "attention_varlen_backward",
           "dropout_mask", "__version__"]


def __getattr__(name):
    # the framework adapters import torch or jax: loaded on first use, e.g. cuflash.torch
    if name in ("torch", "jax"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
