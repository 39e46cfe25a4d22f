"""The card's bf16 matmul rate, for reading attention TFLOP/s as a fraction of it (issue 8
asks for that figure from the same run as the attention benchmark):

    PYTHONPATH=. python3 tools/matmul_peak.py [--n 8192]

torch.matmul (cuBLAS) on n x n x n bf16 matrices, fp32 accumulation, CUDA-event median
(cuflash._bench.time_fn); fp16 too.
"""

import argparse

from cuflash import _bench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192)
    n = p.parse_args().n
    import torch

    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        ms = _bench.time_fn(lambda: torch.matmul(a, b))
        print(f"matmul {str(dtype).split('.')[-1]:8s} {n}^3: {2 * n ** 3 / ms / 1e9:7.1f} TFLOP/s "
              f"({ms:.3f} ms, {torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
