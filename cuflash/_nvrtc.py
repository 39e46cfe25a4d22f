"""Driverless NVRTC: compile a specialisation to a cubin and read ptxas' resource report.

CuPy's ``RawModule`` compiles at run time on a GPU machine. This module compiles the
same source with the same options on any machine, GPU or not: NVRTC needs no driver to
produce a cubin. It loads ``libnvrtc`` through ``cuda-pathfinder`` (pip's
``nvidia-cuda-nvrtc`` wheel, or a CUDA toolkit), and is used by CI
(``tests/test_compile_all.py``) and by ``python -m cuflash compile``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import re
import threading
import time

from . import _kernels


class NvrtcError(RuntimeError):
    """NVRTC failed to compile a kernel; the message carries its log."""


_init_lock = threading.RLock()


def _lib() -> ctypes.CDLL:
    # NVRTC loads libnvrtc-builtins on its first compile; two threads racing there can
    # fail ("failed to open libnvrtc-builtins"), so the first compile runs under a lock.
    with _init_lock:
        return _lib_warm()


@functools.lru_cache(maxsize=None)
def _lib_warm() -> ctypes.CDLL:
    lib = _load_lib()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), b"__global__ void k() {}", b"warm.cu", 0,
                                  None, None), "nvrtcCreateProgram")
    lib.nvrtcCompileProgram(prog, 0, None)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return lib


def _load_lib() -> ctypes.CDLL:
    try:
        from cuda import pathfinder
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "compiling without CuPy needs cuda-pathfinder and an NVRTC library: "
            "pip install 'cuflash[test]'") from e
    lib = ctypes.CDLL(pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(status: int, what: str, log: str = "") -> None:
    if status != 0:
        msg = _lib().nvrtcGetErrorString(status).decode()
        raise NvrtcError(f"{what} failed: {msg}\n{log}")


@dataclasses.dataclass
class CompileResult:
    spec: object
    cubin_bytes: int
    log: str
    seconds: float
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    warnings: list[str]

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.spill_stores > 0 or self.spill_loads > 0


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def diagnostics(log: str) -> list[str]:
    """The warnings of a compile log, and ptxas's numbered notes (``(C7514)`` and kin):
    ptxas reports a serialised ``wgmma`` pipeline as an ``info`` line, not a warning."""
    return [ln for ln in log.splitlines()
            if "warning" in ln.lower() or re.search(r"\(C\d{4}\)", ln)]


def compile_spec(spec, *, source: str | None = None) -> CompileResult:
    """Compile one specialisation to a cubin for ``spec.arch`` and parse ``ptxas -v``."""
    return _compile(spec, source)[0]


def compile_with_cubin(spec) -> tuple[CompileResult, bytes]:
    """compile_spec, with the cubin kept: for checks that read the machine code."""
    result, cubin, _ = _compile(spec, None, keep=True)
    return result, cubin


def build_cubin(spec) -> tuple[bytes, dict[str, str]]:
    """The cubin of ``spec`` and the lowered (mangled) name of each of its kernels: for
    targets that CuPy's own compile cannot name (sm_90a)."""
    _, cubin, names = _compile(spec, None, keep=True)
    return cubin, names


def _compile(spec, source: str | None, keep: bool = False):
    lib = _lib()
    src = (source or _kernels.source_text(spec.source)).encode()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, spec.source.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        for expr in getattr(spec, "name_expressions", (spec.name_expression,)):
            _check(lib.nvrtcAddNameExpression(prog, expr.encode()), "nvrtcAddNameExpression")
        opts = [f"-arch=sm_{spec.arch}", "--ptxas-options=-v", "-ftz=true",
                *_kernels.compile_options()]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        t0 = time.perf_counter()
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        seconds = time.perf_counter() - t0
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        _check(status, f"compiling {spec.name_expression}", log)
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin_bytes = size.value
        cubin, lowered = b"", {}
        if keep:
            buf = ctypes.create_string_buffer(cubin_bytes)
            _check(lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
            cubin = buf.raw
            for expr in getattr(spec, "name_expressions", (spec.name_expression,)):
                name = ctypes.c_char_p()
                _check(lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)),
                       "nvrtcGetLoweredName")
                lowered[expr] = name.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))

    # One report per kernel in the module: keep the worst of each figure.
    regs = [int(x) for x in _RE_REGS.findall(log)]
    stacks = [tuple(map(int, x)) for x in _RE_STACK.findall(log)]
    if not regs or not stacks:
        raise NvrtcError(f"no ptxas resource report for {spec.name_expression}:\n{log}")
    warnings = diagnostics(log)
    result = CompileResult(spec, cubin_bytes, log, seconds, max(regs),
                           max(x[0] for x in stacks), max(x[1] for x in stacks),
                           max(x[2] for x in stacks), warnings)
    return result, cubin, lowered
