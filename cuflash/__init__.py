"""cuflash: FlashAttention for CuPy.

Fused, exact attention kernels written in CUDA C++ and compiled at run time by NVRTC
(through CuPy), with a NumPy reference path that runs the same call on any CPU.

>>> import cuflash
>>> out = cuflash.attention(q, k, v, causal=True)          # doctest: +SKIP
"""

from ._api import attention

__version__ = "0.1.0"
__all__ = ["attention", "__version__"]
