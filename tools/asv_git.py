"""A stand-in for ``git`` on the GPU machine, which receives the working tree but no
``.git``: it answers the few queries that ``asv run --set-commit-hash`` makes, from
``.asv/commits.json`` (written by tools/asv_prepare.py from the real history).

    rev-parse NAME^{commit}         full hash of HEAD/main or of a known hash prefix
    name-rev --name-only ... HASH   the branch (every listed commit is on it)
    rev-list -n 1 --format=%at HASH the commit's timestamp, as git prints it
    config ...                      nothing is set (exit 1)

Anything else fails loudly, so a new asv query cannot be answered wrongly.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

TABLE = pathlib.Path(os.environ.get("CUFLASH_ASV_COMMITS",
                                    pathlib.Path(__file__).resolve().parents[1]
                                    / ".asv" / "commits.json"))


def resolve(name: str, table: dict) -> str | None:
    name = name.removesuffix("^{commit}")
    if name in ("HEAD", table["branch"]):
        return table["head"]
    found = [h for h in table["commits"] if h.startswith(name.lower())] if len(name) >= 4 else []
    return found[0] if len(found) == 1 else None


def main(argv: list[str]) -> int:
    table = json.loads(TABLE.read_text())
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "config":
        return 1
    if cmd == "rev-parse" and len(rest) == 1:
        h = resolve(rest[0], table)
        if h:
            print(h)
            return 0
        print(f"fatal: ambiguous argument '{rest[0]}'", file=sys.stderr)
        return 128
    if cmd == "name-rev" and rest and resolve(rest[-1], table):
        print(table["branch"])
        return 0
    if cmd == "rev-list" and rest[:3] == ["-n", "1", "--format=%at"] and len(rest) == 4:
        h = resolve(rest[3], table)
        if h:
            print(f"commit {h}\n{table['commits'][h]}")
            return 0
    print(f"asv_git.py: unsupported or unknown: git {' '.join(argv)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
