"""Compile every shipped kernel specialisation with NVRTC, with no GPU and no driver,
and fail on any compile error, local-memory spill or stack frame.

NVRTC comes from pip (``nvidia-cuda-nvrtc``, found by ``cuda-pathfinder``); the test
skips when neither is installed. It prints a table of registers and shared memory.
"""

import concurrent.futures
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cuflash import _kernels

_nvrtc = pytest.importorskip("cuflash._nvrtc")


def _nvrtc_available() -> bool:
    try:
        _nvrtc.version()
        return True
    except Exception:
        return False


_WORKERS = max(1, min(8, os.cpu_count() or 1))


@functools.lru_cache(maxsize=None)
def _sm90_builds() -> tuple:
    """Every shipped sm_90a specialisation compiled once for this module's three checks:
    (CompileResult, cubin) pairs, in shipped_sm90_specs' order."""
    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        return tuple(pool.map(_nvrtc.compile_with_cubin, _kernels.shipped_sm90_specs()))


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC (pip install 'cuflash[test]') not found")
def test_compile_all_specialisations_without_spills(capsys):
    specs = _kernels.shipped_specs()
    sm90 = {r.spec.label: r for r, _ in _sm90_builds()}
    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        others = iter(pool.map(_nvrtc.compile_spec, [s for s in specs if s.label not in sm90]))
    results = [sm90[s.label] if s.label in sm90 else next(others) for s in specs]
    assert len(sm90) == len(_kernels.shipped_sm90_specs())  # labels tell them apart
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


#: ptxas diagnostics that make an sm_90a kernel slow without failing it: setmaxnreg ignored
#: (C7508) and wgmma serialised or waited for by the compiler (C7510 and its kin: C75xx
#: naming wgmma; ptxas prints some of them as `info`, which _nvrtc.diagnostics keeps).
def _hopper_problems(result) -> list[str]:
    return [w for w in result.warnings
            if "C7508" in w or ("C75" in w and "wgmma" in w.lower()) or "serializ" in w.lower()]


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC (pip install 'cuflash[test]') not found")
def test_sm90_kernels_keep_wgmma_async_and_setmaxnreg(capsys):
    results = [r for r, _ in _sm90_builds()]
    with capsys.disabled():
        print("\nsm_90a: " + ", ".join(f"{r.spec.label.strip()} ({r.registers} regs at entry, "
                                      f"{r.spec.smem_bytes} B smem)" for r in results))
    for r in results:
        assert not _hopper_problems(r), f"{r.spec.label}: {_hopper_problems(r)}"
        assert not r.spills, f"{r.spec.label} spills"


def test_hopper_warning_filter_catches_the_warnings():
    log = "\n".join([
        "ptxas warning : (C7508) Potential Performance Loss: 'setmaxnreg' ignored",
        "ptxas warning : (C7510) Potential Performance Loss: wgmma.mma_async instructions "
        "are serialized due to ...", "ptxas warning : something else",
        "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to non wgmma instructions reading accumulator registers ...",
        "ptxas info    : (C7517) wgmma.wait_group is injected in around line 2608 by compiler",
        "ptxas info    : Used 168 registers, used 2 barriers",
        "ptxas info    : Compiling entry function '_Z6kernel' for 'sm_90a'"])
    fake = type("R", (), {"warnings": _nvrtc.diagnostics(log)})()
    assert len(fake.warnings) == 5
    assert len(_hopper_problems(fake)) == 4


def _nvdisasm():
    """nvdisasm from PATH, or from pip's nvidia-cuda-nvdisasm (the test extra)."""
    exe = shutil.which("nvdisasm")
    if exe:
        return exe
    try:
        import nvidia
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for path in sorted(Path(base).glob("cu*/bin/nvdisasm")):
            return str(path)
    return None


def _wait_and_exp_order(sass: str) -> str:
    """The waits and exponentials of a kernel's machine code, in order: A for a wait that
    leaves one product group in flight (`WARPGROUP.DEPBAR.LE gsb0, 0x1`), Z for a wait for
    all of them, m for an exponential (`MUFU.EX2`)."""
    found = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([01])|(MUFU\.EX2)", sass)
    return " ".join("m" if mufu else ("A" if n == "1" else "Z") for n, mufu in found)


#: The overlap's schedule in the machine code: after the wait for S_{j+1} (P_j V_j still in
#: flight), the softmax's exponentials, then the wait for P_j V_j. From h2 to h20 ptxas put
#: the second wait before the exponentials, unnoticed (docs/perf-log.md, h16 and h20).
_SOFTMAX_BESIDE_PV = re.compile(r"A(?: m){8,} Z")


def test_order_pattern_tells_the_two_schedules_apart():
    beside = "A " + "m " * 16 + "Z"
    after = "A Z " + "m " * 16
    assert _SOFTMAX_BESIDE_PV.search(beside) and not _SOFTMAX_BESIDE_PV.search(after.strip())
    sass = ("WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n" + "MUFU.EX2 R1, R2 ;\n" * 9
            + "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;")
    assert _wait_and_exp_order(sass) == "A " + "m " * 9 + "Z"


@pytest.mark.skipif(not _nvrtc_available() or _nvdisasm() is None,
                    reason="NVRTC and nvdisasm (pip install 'cuflash[test]') not found")
def test_overlap_kernels_exponentiate_while_p_v_runs():
    """Every sm_90a forward kernel with the overlap keeps its exponentials between the two
    waits of its key loop, so the softmax runs while P_j V_j is on the tensor cores."""
    builds = [(r.spec, cubin) for r, cubin in _sm90_builds()
              if r.spec.kind == "fwd90" and r.spec.tile.overlap]
    assert builds
    hoisted, nvdisasm = [], _nvdisasm()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        for spec, cubin in builds:
            path.write_bytes(cubin)
            sass = subprocess.run([nvdisasm, str(path)], capture_output=True, text=True,
                                  check=True).stdout
            if not _SOFTMAX_BESIDE_PV.search(_wait_and_exp_order(sass)):
                hoisted.append(spec.label.strip())
    assert not hoisted, f"the wait for P V comes before the exponentials in: {hoisted}"


def test_wgmma_wrappers_are_generated_from_the_script():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "gen_wgmma.py"
    if not script.is_file():
        pytest.skip("tools/ is not installed with the package")
    assert subprocess.run([sys.executable, str(script), "--check"]).returncode == 0


def _smem_layout_asserts(specs) -> list[str]:
    """One static_assert a specialisation: the kernel's own shared-memory layout
    (kSmemBytes of its traits) equals the size the host launches it with."""
    asserts = []
    for s in specs:
        tag = _kernels._ELEM_TAG[s.dtype]
        if s.kind == "fwd90":
            t = s.tile
            traits = (f"cuflash::sm90::FwdTraits<{tag}, {s.head_dim}, {t.block_n}, "
                      f"{t.consumers}, {t.stages}, {_kernels._cbool(t.overlap)}, "
                      f"{_kernels._cbool(t.pingpong)}, {_kernels._cbool(s.persistent)}>")
        else:
            traits = f"cuflash::sm90::BwdTraits<{tag}, {s.head_dim}>"
        asserts.append(f'static_assert({traits}::kSmemBytes == {s.smem_bytes}, '
                       f'"{s.label.strip()}: host and kernel disagree on shared memory");')
    return sorted(set(asserts))


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC (pip install 'cuflash[test]') not found")
@pytest.mark.parametrize("kind", ["fwd90", "bwd90"])
def test_sm90_launch_shared_memory_is_the_kernel_layout(kind):
    """The sm_90a kernels lay out their shared memory in C++ (kSmemBytes) and the host
    launches them with ``spec.smem_bytes``: two copies of one sum, which NVRTC compares
    for every shipped specialisation (the forward also traps on a short launch)."""
    specs = [s for s in _kernels.shipped_sm90_specs() if s.kind == kind]
    source = _kernels.source_text(specs[0].source) + "\n" + "\n".join(
        _smem_layout_asserts(specs)) + "\n"
    _nvrtc.compile_spec(specs[0], source=source)  # a failed static_assert fails it


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC (pip install 'cuflash[test]') not found")
def test_sm90_shared_memory_check_fails_on_a_mismatch():
    spec = next(s for s in _kernels.shipped_sm90_specs() if s.kind == "fwd90")
    wrong = _smem_layout_asserts([spec])[0].replace(f"== {spec.smem_bytes}",
                                                    f"== {spec.smem_bytes - 8}")
    source = _kernels.source_text(spec.source) + "\n" + wrong + "\n"
    with pytest.raises(_nvrtc.NvrtcError, match="host and kernel disagree"):
        _nvrtc.compile_spec(spec, source=source)
