"""Terminal tables of the asv results: TFLOP/s per implementation, and cuflash's ratio to
torch's flash (FlashAttention-2) and cuDNN backends.

    python asv_bench/report.py [RESULTS_DIR] [--machine M] [--commit HASH] [--dtype D]
                               [--markdown]

Defaults: the committed results, the machine with the most results, cuflash's newest
commit on it, both dtypes.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_io  # noqa: E402

ORDER = ["cuflash", "cuflash_det", "torch_flash", "torch_cudnn", "torch_efficient",
         "cupy_naive"]
SHORT = {"cuflash": "cuflash", "cuflash_det": "cf_det", "torch_flash": "flash",
         "torch_cudnn": "cudnn", "torch_efficient": "effic", "cupy_naive": "cupy"}
RATIOS = [("cuflash", "torch_flash"), ("cuflash", "torch_cudnn"),
          ("cuflash_det", "torch_flash")]


def table(rows: list[results_io.Row]) -> str:
    impls = [i for i in ORDER if any(r.impl == i for r in rows)]
    cells = collections.defaultdict(dict)
    for r in rows:
        cells[(r.direction, r.dtype, r.head_dim, r.causal, r.seqlen)][r.impl] = r.tflops
    ratios = [(a, b) for a, b in RATIOS if a in impls and b in impls]
    head = f"{'case':32s}" + "".join(f"{SHORT[i]:>8s}" for i in impls)
    head += "".join(f"{SHORT[a] + '/' + SHORT[b]:>15s}" for a, b in ratios)
    lines = [head, "-" * len(head)]
    for key in sorted(cells, key=lambda k: (k[0] != "fwd", k[1], k[2], k[3], k[4])):
        direction, dtype, d, causal, seqlen = key
        c = cells[key]
        line = f"{direction} {dtype:8s} d{d:<3d} {'causal' if causal else 'full':6s} L{seqlen:<6d}"
        line += "".join(f"{c[i]:8.1f}" if i in c else f"{'-':>8s}" for i in impls)
        line += "".join(f"{c[a] / c[b]:15.2f}" if a in c and b in c else f"{'-':>15s}"
                        for a, b in ratios)
        lines.append(line)
    return "\n".join(lines)


def markdown(rows: list[results_io.Row], dtype="bfloat16", seqlens=(1024, 4096, 16384)) -> str:
    """The README's table: TFLOP/s at three seqlens and cuflash's ratios."""
    cells = collections.defaultdict(dict)
    for r in rows:
        if r.dtype == dtype and r.seqlen in seqlens:
            cells[(r.direction, r.head_dim, r.causal)].setdefault(r.impl, {})[r.seqlen] = r.tflops

    def join(values):
        return " / ".join(values)

    def col(c, impl):
        return join(f"{c[impl][L]:.0f}" if L in c.get(impl, {}) else "-" for L in seqlens)

    def ratio(c, a, b):
        return join(f"{c[a][L] / c[b][L]:.2f}" if L in c.get(a, {}) and L in c.get(b, {})
                    else "-" for L in seqlens)

    lines = ["| case | cuflash | torch flash (FA2) | torch cuDNN | cuflash / FA2 "
             "| cuflash / cuDNN | deterministic / FA2 |", "|---" * 7 + "|"]
    for key in sorted(cells, key=lambda k: (k[0] != "fwd", k[1], k[2])):
        direction, d, causal = key
        c = cells[key]
        det = ratio(c, "cuflash_det", "torch_flash") if "cuflash_det" in c else ""
        lines.append(f"| {direction} d{d}{' causal' if causal else ''} | {col(c, 'cuflash')} "
                     f"| {col(c, 'torch_flash')} | {col(c, 'torch_cudnn')} "
                     f"| {ratio(c, 'cuflash', 'torch_flash')} "
                     f"| {ratio(c, 'cuflash', 'torch_cudnn')} | {det} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", type=pathlib.Path, default=results_io.RESULTS)
    p.add_argument("--machine")
    p.add_argument("--commit")
    p.add_argument("--dtype")
    p.add_argument("--markdown", action="store_true",
                   help="the README's table (bf16, L = 1k / 4k / 16k)")
    args = p.parse_args(argv)
    rows = results_io.load(args.results, args.machine)
    if not rows:
        print(f"no results under {args.results}", file=sys.stderr)
        return 1
    machine = args.machine or results_io.busiest_machine(rows)
    rows = [r for r in rows if r.machine == machine]
    commit = args.commit or results_io.latest_commit(rows)
    rows = [r for r in rows if r.commit.startswith(commit)
            and (args.dtype is None or r.dtype == args.dtype)]
    info = results_io.machines(args.results).get(machine, {})
    if args.markdown:
        print(markdown(rows))
        return 0
    print(f"machine {machine} ({info.get('cpu', '?')}), commit {commit[:8]}; TFLOP/s")
    print(table(rows))
    for m, c, _, times in results_io.first_call(args.results, machine):
        if c.startswith(commit):
            print(f"first call (fp16 d128): cold cache {times['cold']:.2f} s, "
                  f"warm cache {times['warm_cache']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
