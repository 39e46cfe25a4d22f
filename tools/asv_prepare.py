"""Prepare an asv run on the GPU machine (run here, in a clean checkout of main).

    python tools/asv_prepare.py [--head-impls IMPLS] [--backfill HASH[:IMPLS] ...]
                                [--backfill-bench REGEX]

The GPU machine receives the working tree but no ``.git``, no network and no asv. This
writes, into ignored paths that the device call carries:

- ``.whl/``: the asv wheels (pip download for the machine's Python 3.12);
- ``.asv/commits.json``: every commit of main with its author timestamp, so that asv
  records each result against the right hash and date (``tools/asv_git.py`` answers
  asv's git queries from it there);
- ``.asv/plan.txt``: one line per commit to time, ``HASH TREE IMPLS [BENCH]``: HEAD's
  tree is the working tree itself; each backfill commit gets its own source tree under
  ``.asv/trees/HASH`` (``git archive``). IMPLS is ``all`` or a comma list of the
  implementations to time (``cuflash,cuflash_det`` skips the peers at that commit);
  BENCH, an asv ``-b`` regex, limits the benchmarks (``FirstCall`` fills in one
  benchmark at commits that have the rest).

Then on the device: ``bash tools/asv_device.sh`` with ``carry: [".whl", ".asv"]``, and
here ``python asv_bench/collect.py FILES_AT`` merges the results and redraws the plots.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELS = ["asv==0.6.6", "asv_runner==0.3.2", "json5==0.17.3", "importlib_metadata==10.2.0",
          "lazy-importer==0.1.0", "Pympler==1.1"]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def download_wheels(dest: pathlib.Path) -> None:
    if dest.is_dir() and len(list(dest.glob("*.whl"))) >= len(WHEELS):
        return
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                    "cp", "--platform", "manylinux2014_x86_64", "-d", str(dest), *WHEELS],
                   check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backfill", nargs="*", default=[],
                   help="older commits to time, HASH or HASH:IMPLS (default IMPLS: all)")
    p.add_argument("--head-impls", default="all",
                   help="implementations timed at HEAD (default: all)")
    p.add_argument("--backfill-bench", default="",
                   help="asv -b regex for the backfill commits (default: every benchmark)")
    p.add_argument("--no-head", action="store_true", help="time only the backfill commits")
    args = p.parse_args(argv)

    if git("status", "--porcelain", "--untracked-files=no"):
        print("commit first: the results are recorded against HEAD", file=sys.stderr)
        return 1
    head = git("rev-parse", "HEAD")
    asv_dir = ROOT / ".asv"
    shutil.rmtree(asv_dir, ignore_errors=True)
    (asv_dir / "trees").mkdir(parents=True)

    commits = {}
    for line in git("log", "--format=%H %at", "HEAD").splitlines():
        h, ts = line.split()
        commits[h] = int(ts)
    (asv_dir / "commits.json").write_text(json.dumps({"head": head, "branch": "main",
                                                      "commits": commits}, indent=1))
    plan = [] if args.no_head else [f"{head} . {args.head_impls}"]
    for item in args.backfill:
        ref, _, impls = item.partition(":")
        h = git("rev-parse", f"{ref}^{{commit}}")
        tree = asv_dir / "trees" / h[:12]
        tree.mkdir()
        archive = subprocess.run(["git", "archive", h], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        plan.append(f"{h} .asv/trees/{h[:12]} {impls or 'all'} {args.backfill_bench}".strip())
    (asv_dir / "plan.txt").write_text("\n".join(plan) + "\n")
    (ROOT / ".git-commit").write_text(head[:7] + "\n")
    download_wheels(ROOT / ".whl")
    print("\n".join(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
