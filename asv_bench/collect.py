"""Merge the asv results of a device run into ``asv_bench/results``, then redraw the
plots and print the report of the newest commit.

    python asv_bench/collect.py FILES_AT      # the folder the device tool returned

FILES_AT holds ``asv-results.tgz`` (written by tools/asv_device.sh). A result file that
already exists (same machine, commit and environment) is merged benchmark by benchmark:
a benchmark measured in the new run replaces the old entry; the others are kept.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"


def merge_file(new: pathlib.Path, dest: pathlib.Path) -> None:
    if not dest.exists():
        shutil.copy(new, dest)
        return
    old_data, new_data = json.loads(dest.read_text()), json.loads(new.read_text())
    assert old_data["result_columns"] == new_data["result_columns"], dest
    for name, entry in new_data["results"].items():
        if entry[0] is not None or name not in old_data["results"]:
            old_data["results"][name] = entry
    old_data["durations"].update(new_data.get("durations", {}))
    dest.write_text(json.dumps(old_data, indent=None, sort_keys=True))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(pathlib.Path(argv[0]) / "asv-results.tgz") as tar:
            tar.extractall(tmp, filter="data")
        new_root = pathlib.Path(tmp) / "results"
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(new_root / "benchmarks.json", RESULTS / "benchmarks.json")
        for machine_dir in sorted(p for p in new_root.iterdir() if p.is_dir()):
            dest_dir = RESULTS / machine_dir.name
            dest_dir.mkdir(exist_ok=True)
            for f in sorted(machine_dir.glob("*.json")):
                if f.name == "machine.json":
                    shutil.copy(f, dest_dir / f.name)
                else:
                    merge_file(f, dest_dir / f.name)
                print(f"{machine_dir.name}/{f.name}")
    subprocess.run([sys.executable, str(HERE / "plot.py")], check=True)
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
