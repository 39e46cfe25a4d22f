"""Backward TFLOP/s (bf16, the bench's shapes: batch * L = 16k tokens, 2048 / d heads) for
the tree on PYTHONPATH, optionally torch's cuDNN backend beside it:

    PYTHONPATH=TREE python3 tools/ab_backward.py TAG [--cudnn] [--det] [--seqlens 1024,4096]

For same-call A/B runs of two trees (docs/results/bwd-ab-*.txt). --det times the
deterministic mode instead; tools/ab_timing.py."""
from ab_timing import main

main("bwd", "64,128")
