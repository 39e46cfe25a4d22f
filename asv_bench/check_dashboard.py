"""Check the dashboard that ``asv publish`` built (CI runs this after publishing).

    python asv_bench/check_dashboard.py [--min-commits N]

Fails unless ``asv_bench/html`` holds every suite benchmark and, on each machine with
results, cuflash's and at least one peer's series over at least N commits (default 2).
In a shallow clone asv cannot date the commits and the dashboard is empty: that is
reported, and checked only for having been built.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_io  # noqa: E402

HTML = pathlib.Path(__file__).resolve().parent / "html"


def shallow() -> bool:
    out = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], capture_output=True,
                         text=True, cwd=HTML.parent)
    return out.stdout.strip() == "true"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-commits", type=int, default=2)
    args = p.parse_args(argv)
    index = json.loads((HTML / "index.json").read_text())
    suite = json.loads((results_io.RESULTS / "benchmarks.json").read_text())
    missing = sorted(set(suite) - {"version"} - set(index["benchmarks"]))
    if missing:
        print(f"dashboard lacks benchmarks: {missing}")
        return 1
    if shallow():
        print("shallow clone: asv cannot date the commits, so the dashboard has no "
              "history here; it was built")
        return 0
    problems = []
    rows = results_io.load()
    for machine in sorted({r.machine for r in rows}):
        commits = {}
        for r in rows:
            if r.machine == machine:
                commits.setdefault(r.impl, set()).add(r.commit)
        for impl in ("cuflash", "torch_flash"):
            n = len(commits.get(impl, ()))
            if n < args.min_commits:
                problems.append(f"{machine}: {impl} has results at {n} commits")
        dated = set(index["revision_to_hash"].values())
        undated = {c for cs in commits.values() for c in cs} - dated
        if undated:
            problems.append(f"{machine}: commits not on the branch: {sorted(undated)}")
        print(f"{machine}: " + ", ".join(f"{i} {len(c)} commits" for i, c in
                                         sorted(commits.items())))
    print(f"dashboard: {len(index['revision_to_hash'])} commits, "
          f"{len(index['benchmarks'])} benchmarks")
    for line in problems:
        print("problem:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
