"""Which instructions a compute-sanitizer racecheck report names, for the sm_90a kernels:
reads the report, takes each kernel's cubin from the sm_90a disk cache (cuflash/_sm90.py;
compiled if missing), and prints the SASS instruction at every reported offset, with its
hazard count.

    python3 tools/race_sites.py RACECHECK_LOG [--cuobjdump PATH]

(The sm_90a backward's known reports are the producer's bulk copies of lse and delta,
UBLKCP, against the consumers' shared-memory reads of them, which the stage barriers
order: docs/hopper.md, Tools and checks.)
"""
import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from cuflash import _kernels, _sm90

SITE = re.compile(r"(Write|Read) access at (.+?)\+0x([0-9a-f]+)(?: \[(\d+) hazards\])?")


def normalized(name: str) -> str:
    """A kernel's template name as racecheck prints it or as a spec writes it, reduced to
    one form: flash_bwd_sm90_kernel<f16_t,128,1,0,0,0>."""
    core = name[name.index("flash_"):]
    core = core[:core.index(">") + 1]
    for a, b in (("(int)", ""), ("(bool)", ""), ("cuflash::", ""), (" ", ""), ("true", "1"),
                 ("false", "0")):
        core = core.replace(a, b)
    return core


def sass_by_kernel(names, cuobjdump: str) -> dict:
    """{normalized kernel name: {offset: instruction}} for the sm_90a kernels named
    (their cubins from the disk cache, or compiled)."""
    out = {}
    for spec in _kernels.shipped_sm90_specs():
        key = normalized(spec.name_expression)
        if key not in names:
            continue
        cubin, _ = _sm90._cached_cubin(spec)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as tmp:
            tmp.write(cubin)
            tmp.flush()
            sass = subprocess.run([cuobjdump, "-sass", tmp.name], capture_output=True,
                                  text=True).stdout
        table = {}
        for line in sass.splitlines():
            m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
            if m:
                table[int(m.group(1), 16)] = m.group(2).strip()
        out[key] = table
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--cuobjdump", default="cuobjdump")
    a = p.parse_args()
    counts = collections.Counter()
    for line in Path(a.log).read_text().splitlines():
        m = SITE.search(line)
        if m:
            kind, kernel, off, n = m.group(1), m.group(2), int(m.group(3), 16), m.group(4)
            counts[(kind, normalized(kernel), off)] += int(n or 1)
    kernels = sass_by_kernel({k for _, k, _ in counts}, a.cuobjdump)
    opcodes = collections.Counter()
    for (kind, kernel, off), n in sorted(counts.items()):
        ins = kernels.get(kernel, {}).get(off, "?")
        opcodes[(kind, ins.split()[0])] += 1
        print(f"{kind:5s} {kernel} +0x{off:x}: {ins}  [{n}]")
    print("sites by access and opcode:",
          ", ".join(f"{k} {op}: {n}" for (k, op), n in sorted(opcodes.items())))
    sys.exit(1 if any(op == "?" for _, op in opcodes) else 0)


if __name__ == "__main__":
    main()
