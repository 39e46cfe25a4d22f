"""Read the committed asv results (``asv_bench/results``) into plain rows, with TFLOP/s.

No asv import is needed: the files are JSON, one per (machine, commit, environment);
each parametrised benchmark stores its values flattened in the product order of its
parameter lists.
"""

from __future__ import annotations

import ast
import collections
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


def _result_files(results: pathlib.Path, machine: str | None):
    """(machine name, parsed JSON) of each result file, optionally of one machine."""
    for path in sorted(results.glob("*/*.json")):
        if path.name != "machine.json" and (machine is None or path.parent.name == machine):
            yield path.parent.name, json.loads(path.read_text())


def _measured(data: dict, benchmark: str):
    """(values, parameter lists) of one benchmark in a result file; None where it is
    absent or failed as a whole (its setup_cache)."""
    entry = data["results"].get(benchmark)
    columns = data["result_columns"]
    if entry is None or entry[columns.index("result")] is None:
        return None
    params = [[ast.literal_eval(p) for p in plist] for plist in entry[columns.index("params")]]
    return entry[columns.index("result")], params


def load(results: pathlib.Path = RESULTS, machine: str | None = None) -> list[Row]:
    rows = []
    for name, data in _result_files(results, machine):
        for benchmark, direction in GRIDS.items():
            measured = _measured(data, benchmark)
            if measured is None:
                continue
            values, params = measured
            for combo, seconds in zip(itertools.product(*params), values):
                if seconds is None or seconds != seconds:  # skipped, failed, NaN
                    continue
                impl, dtype, head_dim, causal, seqlen = combo
                rows.append(Row(name, data["commit_hash"], data["date"],
                                direction, impl, dtype, head_dim, causal, seqlen, seconds))
    return rows


def first_call(results: pathlib.Path = RESULTS, machine: str | None = None):
    """(machine, commit, date, {'cold': s, 'warm_cache': s}) per results file."""
    out = []
    for name, data in _result_files(results, machine):
        measured = _measured(data, "attention.FirstCall.track_seconds")
        if measured is not None:
            values, (caches,) = measured
            out.append((name, data["commit_hash"], data["date"], dict(zip(caches, values))))
    return out


def busiest_machine(rows: list[Row]) -> str:
    """The machine with the most results (the default of the report and the plots)."""
    return collections.Counter(r.machine for r in rows).most_common(1)[0][0]


def latest_commit(rows: list[Row], impl: str = "cuflash") -> str:
    """The newest commit (by date) with results of ``impl``."""
    return max((r for r in rows if r.impl == impl), key=lambda r: r.date).commit
