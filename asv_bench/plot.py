"""Draw the README's performance plots from the committed asv results.

    python asv_bench/plot.py [--machine M] [--commit HASH] [--out docs]

Writes, for one machine (default: the one with the most results) and one commit
(default: cuflash's newest there):
- ``perf-fwd.png``, ``perf-bwd.png``: TFLOP/s against seqlen per implementation, one
  panel per head dim and causal setting (float16, the dtype that every peer runs);
- ``perf-ratio.png``: cuflash's TFLOP/s over each peer's, forward and backward, bf16;
- ``perf-history.png``: cuflash's TFLOP/s over the benchmarked commits (L = 4096, bf16).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_io  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
STYLE = {"cuflash": ("C0", "o", "-"), "cuflash_det": ("C0", "o", ":"),
         "torch_flash": ("C1", "s", "-"), "torch_cudnn": ("C2", "^", "-"),
         "torch_efficient": ("C4", "v", "-"), "cupy_naive": ("C3", "x", "-")}
PANELS = [(d, c) for d in (64, 128) for c in (False, True)]


def _panel_title(d, causal):
    return f"d{d}, {'causal' if causal else 'full'}"


def plot_tflops(rows, direction, dtype, title, path):
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), sharey=True)
    for ax, (d, causal) in zip(axes, PANELS):
        for impl, (color, marker, ls) in STYLE.items():
            pts = sorted((r.seqlen, r.tflops) for r in rows if r.impl == impl
                         and r.direction == direction and r.dtype == dtype
                         and r.head_dim == d and r.causal == causal)
            if pts:
                ax.plot(*zip(*pts), color=color, marker=marker, ls=ls, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seqlen (batch·seqlen = 16384)")
        ax.set_title(_panel_title(d, causal))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].set_ylim(bottom=0)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratio(rows, dtype, title, path):
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), sharey=True)
    for row_axes, direction in zip(axes, ("fwd", "bwd")):
        for ax, (d, causal) in zip(row_axes, PANELS):
            sel = [r for r in rows if r.direction == direction and r.dtype == dtype
                   and r.head_dim == d and r.causal == causal]
            ours = {r.seqlen: r.tflops for r in sel if r.impl == "cuflash"}
            for impl, (color, marker, ls) in STYLE.items():
                if impl.startswith("cuflash") or impl == "cupy_naive":
                    continue
                peer = {r.seqlen: r.tflops for r in sel if r.impl == impl}
                pts = sorted((L, ours[L] / peer[L]) for L in ours if L in peer)
                if pts:
                    ax.plot(*zip(*pts), color=color, marker=marker, ls=ls,
                            label=f"cuflash / {impl}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{direction} {_panel_title(d, causal)}")
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel("cuflash TFLOP/s ÷ peer's")
    for ax in axes[1]:
        ax.set_xlabel("seqlen")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(rows, title, path, seqlen=4096, dtype="bfloat16"):
    commits = sorted({(r.date, r.commit) for r in rows})
    x_of = {c: i for i, (_, c) in enumerate(commits)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), sharey=True)
    for ax, direction in zip(axes, ("fwd", "bwd")):
        for i, (d, causal) in enumerate(PANELS):
            for impl, marker, ls in (("cuflash", "o", "-"), ("torch_flash", "s", ":")):
                pts = sorted((x_of[r.commit], r.tflops) for r in rows
                             if (r.impl, r.direction, r.dtype, r.head_dim, r.causal,
                                 r.seqlen) == (impl, direction, dtype, d, causal, seqlen))
                if pts:
                    ax.plot(*zip(*pts), color=f"C{i}", marker=marker, ls=ls,
                            label=f"{impl} {_panel_title(d, causal)}")
        ax.set_xticks(range(len(commits)), [c[:7] for _, c in commits], rotation=30)
        ax.set_xlabel("commit (oldest first)")
        ax.set_title(f"{direction}, {dtype}, L={seqlen}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].set_ylim(bottom=0)
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine")
    p.add_argument("--commit")
    p.add_argument("--out", type=pathlib.Path, default=DOCS)
    args = p.parse_args(argv)
    rows = results_io.load()
    if not rows:
        print("no results in asv_bench/results", file=sys.stderr)
        return 1
    machine = args.machine or results_io.busiest_machine(rows)
    rows = [r for r in rows if r.machine == machine]
    commit = args.commit or results_io.latest_commit(rows)
    at_commit = [r for r in rows if r.commit.startswith(commit)]
    gpu = results_io.machines().get(machine, {}).get("cpu", machine).split(";")[0]
    where = f"{gpu}, cuflash {commit[:7]}"
    args.out.mkdir(exist_ok=True)
    plot_tflops(at_commit, "fwd", "float16", f"Forward, float16: {where}",
                args.out / "perf-fwd.png")
    plot_tflops(at_commit, "bwd", "float16", f"Backward, float16: {where}",
                args.out / "perf-bwd.png")
    plot_ratio(at_commit, "bfloat16", f"cuflash against the peers, bfloat16: {where}",
               args.out / "perf-ratio.png")
    plot_history(rows, f"cuflash over its history next to torch flash (FA2): {gpu}",
                 args.out / "perf-history.png")
    for name in ("perf-fwd", "perf-bwd", "perf-ratio", "perf-history"):
        print(args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
