"""Compare the machine code (SASS) of kernel specialisations between two source trees, with
no GPU: NVRTC compiles each to a cubin, ``cuobjdump -sass`` disassembles it, and the
instruction streams are compared line by line (operands included). Identical streams
mean identical kernels, so a timing of one holds for the other; lines that differ only
in constant-bank offsets (``c[0x0][...]``: kernel parameters that moved) are counted
apart.

    python3 tools/sass_diff.py OTHER_TREE [--arch 90] [--cuobjdump PATH]

OTHER_TREE is a checkout (``git worktree add /tmp/old <commit>``); this tree is the one
the script lives in. cuobjdump comes from the CUDA toolkit or the ``nvidia-cuda-cuobjdump``
wheel.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# (kind, dtype, head dim, causal, family): family 0 plain, 1 options, 2 options + dropout
CASES = [(kind, "bfloat16", 128, causal, fam) for kind in ("fwd", "bwd")
         for causal in (False, True) for fam in (0, 1, 2)]
CASES += [("fwd", "float16", 64, True, 1), ("bwd", "float16", 64, True, 1)]

_WORKER = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from cuflash import _kernels, _nvrtc
kind, dtype, d, causal, fam, arch, out = sys.argv[2:9]
kw = {"options": fam != "0", "dropout": fam == "2"}
args = (dtype, int(d), int(d), causal == "1", True, int(arch))
try:
    spec = (_kernels.fwd_spec(*args, **kw) if kind == "fwd"
            else _kernels.bwd_spec(*args, True, **kw))
except TypeError:  # a tree from before the dropout kernels
    if fam == "2":
        sys.exit(3)
    kw.pop("dropout")
    spec = (_kernels.fwd_spec(*args, **kw) if kind == "fwd"
            else _kernels.bwd_spec(*args, True, **kw))
lib = _nvrtc._lib()
prog = ctypes.c_void_p()
src = _kernels.source_text(spec.source).encode()
lib.nvrtcCreateProgram(ctypes.byref(prog), src, spec.source.encode(), 0, None, None)
lib.nvrtcAddNameExpression(prog, spec.name_expression.encode())
opts = [f"-arch=sm_{spec.arch}", "-ftz=true", *_kernels.compile_options()]
arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
assert lib.nvrtcCompileProgram(prog, len(opts), arr) == 0
size = ctypes.c_size_t()
lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
buf = ctypes.create_string_buffer(size.value)
lib.nvrtcGetCUBIN(prog, buf)
open(out, "wb").write(buf.raw)
print(spec.label)
"""

_INSN = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+([^;]*);")
_CONST = re.compile(r"c\[0x0\]\[0x[0-9a-f]+\]")
_BRANCH = re.compile(r"(BRA|CALL\.REL\S*|BSSY|SSY)\s+(\S+\s+)?0x[0-9a-f]+")


def sass(tree: Path, case, arch: int, cuobjdump: str, tmp: str):
    out = os.path.join(tmp, "k.cubin")
    kind, dtype, d, causal, fam = case
    p = subprocess.run([sys.executable, "-c", _WORKER, str(tree), kind, dtype, str(d),
                        str(int(causal)), str(fam), str(arch), out],
                       capture_output=True, text=True)
    if p.returncode == 3:
        return None, []
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    dis = subprocess.run([cuobjdump, "-sass", out], capture_output=True, text=True, check=True)
    return p.stdout.strip(), [m.group(1).strip() for m in map(_INSN.match, dis.stdout.splitlines())
                              if m]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("other", type=Path)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cuobjdump", default=os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump"))
    a = ap.parse_args()
    if not a.cuobjdump:
        print("cuobjdump not found (--cuobjdump or CUOBJDUMP)", file=sys.stderr)
        return 2
    print(f"{'specialisation (this tree)':70s} {'insns':>6s} {'other':>6s} {'differ':>6s} "
          f"{'differ, offsets aside':>21s}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            label, mine = sass(HERE, case, a.arch, a.cuobjdump, tmp)
            _, theirs = sass(a.other, case, a.arch, a.cuobjdump, tmp)
            if not theirs:
                print(f"{label:70s} {len(mine):6d} {'-':>6s}")
                continue
            norm = lambda s: _BRANCH.sub(r"\1 <target>", _CONST.sub("c[param]", s))  # noqa: E731
            differ = sum(x != y for x, y in zip(mine, theirs)) + abs(len(mine) - len(theirs))
            differ_norm = (sum(norm(x) != norm(y) for x, y in zip(mine, theirs))
                           + abs(len(mine) - len(theirs)))
            print(f"{label:70s} {len(mine):6d} {len(theirs):6d} {differ:6d} {differ_norm:21d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
