"""Plain forward TFLOP/s (bf16, the bench's shapes: batch * L = 16k tokens, 2048 / d heads)
for the tree on PYTHONPATH, optionally torch's cuDNN backend beside it:

    PYTHONPATH=TREE python3 tools/ab_forward.py TAG [--cudnn] [--head-dims 64,128,256]
                                                    [--seqlens 1024,4096,16384]
                                                    [--max-blocks N] [--max-key-tiles N]

For same-call A/B runs of two trees (docs/results/fwd-ab-*.txt); tools/ab_timing.py."""
from ab_timing import main

main("fwd", "64,128,256")
