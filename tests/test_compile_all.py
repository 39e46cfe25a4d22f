"""Compile every shipped kernel specialisation with NVRTC, with no GPU and no driver,
and fail on any compile error, local-memory spill or stack frame.

NVRTC comes from pip (``nvidia-cuda-nvrtc``, found by ``cuda-pathfinder``); the test
skips when neither is installed. It prints a table of registers and shared memory.
"""

import concurrent.futures
import os

import pytest

from cuflash import _kernels

_nvrtc = pytest.importorskip("cuflash._nvrtc")


def _nvrtc_available() -> bool:
    try:
        _nvrtc.version()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC (pip install 'cuflash[test]') not found")
def test_compile_all_specialisations_without_spills(capsys):
    specs = _kernels.shipped_specs()
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(_nvrtc.compile_spec, specs))
    lines = [f"NVRTC {'.'.join(map(str, _nvrtc.version()))}: {len(results)} specialisations",
             f"{'specialisation':78s} {'regs':>4s} {'smem':>8s} {'stack':>5s} {'spill':>5s}"]
    for r in results:
        lines.append(f"{r.spec.label:78s} {r.registers:4d} {r.spec.smem_bytes:8d} "
                     f"{r.stack_bytes:5d} {r.spill_stores + r.spill_loads:5d}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    bad = [r.spec.label for r in results if r.spills]
    assert not bad, f"local-memory spills or stack frames in: {bad}"
    assert all(r.cubin_bytes > 0 for r in results)
