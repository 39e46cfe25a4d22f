"""cuflash: FlashAttention for CuPy.

Fused, exact attention kernels written in CUDA C++ and compiled at run time by NVRTC
(through CuPy), with a NumPy reference path that runs the same call on any CPU.

>>> import cuflash
>>> out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)   # doctest: +SKIP
>>> dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)  # doctest: +SKIP
"""

from ._api import attention, attention_backward

__version__ = "0.1.0"
__all__ = ["attention", "attention_backward", "__version__"]
