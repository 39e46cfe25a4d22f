"""Read the committed asv results (``asv_bench/results``) into plain rows, with TFLOP/s.

No asv import is needed: the files are JSON, one per (machine, commit, environment);
each parametrised benchmark stores its values flattened in the product order of its
parameter lists.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TOKENS = 16384  # batch * seqlen, as in benchmarks/attention.py
HIDDEN = 2048  # heads * head_dim
GRIDS = {"attention.Forward.track_seconds": "fwd", "attention.Backward.track_seconds": "bwd"}


@dataclasses.dataclass(frozen=True)
class Row:
    machine: str
    commit: str
    date: int  # ms since the epoch, the commit's
    direction: str
    impl: str
    dtype: str
    head_dim: int
    causal: bool
    seqlen: int
    seconds: float

    @property
    def tflops(self) -> float:
        """4·b·h·L²·d for the forward pass, 2.5 times that backward, halved when causal."""
        flops = 4.0 * TOKENS * self.seqlen * HIDDEN
        flops *= 2.5 if self.direction == "bwd" else 1.0
        flops /= 2 if self.causal else 1
        return flops / self.seconds / 1e12


def machines(results: pathlib.Path = RESULTS) -> dict[str, dict]:
    """machine name -> its machine.json (``cpu`` names the GPU, driver and software)."""
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted(results.glob("*/machine.json"))}


def load(results: pathlib.Path = RESULTS, machine: str | None = None) -> list[Row]:
    rows = []
    for path in sorted(results.glob("*/*.json")):
        if path.name == "machine.json" or (machine and path.parent.name != machine):
            continue
        data = json.loads(path.read_text())
        columns = data["result_columns"]
        for name, direction in GRIDS.items():
            entry = data["results"].get(name)
            if entry is None:
                continue
            values = entry[columns.index("result")]
            if values is None:  # the whole grid failed (its setup_cache)
                continue
            params = [[ast.literal_eval(p) for p in plist]
                      for plist in entry[columns.index("params")]]
            for combo, seconds in zip(itertools.product(*params), values):
                if seconds is None or seconds != seconds:  # skipped, failed, NaN
                    continue
                impl, dtype, head_dim, causal, seqlen = combo
                rows.append(Row(path.parent.name, data["commit_hash"], data["date"],
                                direction, impl, dtype, head_dim, causal, seqlen, seconds))
    return rows


def first_call(results: pathlib.Path = RESULTS, machine: str | None = None):
    """(machine, commit, date, {'cold': s, 'warm_cache': s}) per results file."""
    out = []
    for path in sorted(results.glob("*/*.json")):
        if path.name == "machine.json" or (machine and path.parent.name != machine):
            continue
        data = json.loads(path.read_text())
        entry = data["results"].get("attention.FirstCall.track_seconds")
        if entry and entry[0] is not None:
            cols = data["result_columns"]
            names = [ast.literal_eval(p) for p in entry[cols.index("params")][0]]
            out.append((path.parent.name, data["commit_hash"], data["date"],
                        dict(zip(names, entry[cols.index("result")]))))
    return out


def latest_commit(rows: list[Row], impl: str = "cuflash") -> str:
    """The newest commit (by date) with results of ``impl``."""
    return max((r for r in rows if r.impl == impl), key=lambda r: r.date).commit
