"""Summarise ncu's source page (SASS) of one kernel: where the warps' stall samples sit.

    ncu --section SourceCounters ... -o REPORT python3 ...
    ncu --import REPORT.ncu-rep --page source --csv --print-source sass > SASS.csv
    python3 tools/ncu_sass.py SASS.csv [--top 40] [--title TEXT]

Prints the total samples, then the instructions with the most samples, each with its two
largest stall reasons, and the samples summed by reason over the kernel.
"""

import argparse
import collections
import csv
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    cols = rows[head]
    data = [dict(zip(cols, r)) for r in rows[head + 1:] if len(r) == len(cols)]
    reasons = [c for c in cols if c.startswith("stall_")]
    num = lambda x: float(x.replace(",", "") or 0)  # noqa: E731
    samples_col = "Warp Stall Sampling (All Samples)"
    total = sum(num(d[samples_col]) for d in data)
    by_reason = collections.Counter()
    for d in data:
        for r in reasons:
            by_reason[r[6:]] += num(d[r])
    if a.title:
        print(a.title)
    print(f"{int(total)} warp stall samples over {len(data)} SASS instructions; "
          f"the {a.top} instructions with most samples")
    print("index  samples  share  top reasons  instruction")
    ranked = sorted(enumerate(data), key=lambda x: -num(x[1][samples_col]))[:a.top]
    for i, d in ranked:
        s = num(d[samples_col])
        top = sorted(((num(d[r]), r[6:]) for r in reasons), reverse=True)[:2]
        why = ", ".join(f"{n} {int(v)}" for v, n in top if v)
        print(f"{i:5d} {int(s):8d} {100 * s / total:5.1f}%  {why}  {d['Source'].strip()}")
    print("samples by reason:")
    for r, v in by_reason.most_common(12):
        print(f"  {r:20s} {int(v):9d} {100 * v / total:5.1f}%")


if __name__ == "__main__":
    sys.exit(main())
