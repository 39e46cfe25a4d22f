"""Kernel specialisations: tile choice, template names and compile options.

Nothing here needs CuPy or a GPU, so the CPU test suite and CI can enumerate and
compile every shipped specialisation (``tests/test_compile_all.py``) with the exact
names and options that :mod:`cuflash._dispatch` uses at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from pathlib import Path

#: Head dims are rounded up to one of these; loads and stores are predicated on the
#: real head dim, so e.g. D = 40 runs the 64 kernel with zero-filled columns.
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)

#: Compute capabilities that CI compiles every specialisation for.
SHIPPED_ARCHS = (80, 90)

DTYPES = ("float16", "bfloat16")

_ELEM_TAG = {"float16": "cuflash::f16_t", "bfloat16": "cuflash::bf16_t"}


@dataclasses.dataclass(frozen=True)
class FwdTile:
    """Forward tiling: rows per block, keys per step, warps, K/V stages, blocks per SM."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int
    min_blocks: int

    def smem_bytes(self, head_dim: int, head_dim_v: int) -> int:
        q_bytes = self.block_m * max(head_dim, head_dim_v) * 2
        kv_bytes = self.block_n * (head_dim + head_dim_v) * 2
        return q_bytes + self.stages * kv_bytes


# Tuned on the H100 (docs/perf-log.md); keyed by head-dim bucket. Each must compile
# without local-memory spills (tests/test_compile_all.py checks this).
FWD_TILES = {
    32: FwdTile(128, 64, 4, 2, 2),
    64: FwdTile(128, 64, 4, 1, 2),
    96: FwdTile(128, 32, 4, 1, 2),
    128: FwdTile(128, 32, 4, 1, 2),
    160: FwdTile(128, 32, 8, 2, 1),
    192: FwdTile(128, 32, 8, 2, 1),
    224: FwdTile(128, 16, 8, 2, 1),
    256: FwdTile(128, 16, 8, 2, 1),
}


def head_dim_bucket(d: int) -> int:
    """The smallest bucket that holds head dim ``d`` (1 <= d <= 256)."""
    for b in HEAD_DIM_BUCKETS:
        if d <= b:
            return b
    raise ValueError(f"head dim must be at most {HEAD_DIM_BUCKETS[-1]}, got {d}")


@dataclasses.dataclass(frozen=True)
class FwdSpec:
    """One compiled forward kernel: everything that is a template argument, plus arch."""

    dtype: str
    head_dim: int
    head_dim_v: int
    causal: bool
    vec: bool
    arch: int
    tile: FwdTile

    @property
    def threads(self) -> int:
        return self.tile.num_warps * 32

    @property
    def smem_bytes(self) -> int:
        return self.tile.smem_bytes(self.head_dim, self.head_dim_v)

    @property
    def name_expression(self) -> str:
        t = self.tile
        args = [
            _ELEM_TAG[self.dtype], self.head_dim, self.head_dim_v, t.block_m, t.block_n,
            t.num_warps, t.stages, t.min_blocks, _cbool(self.causal), _cbool(self.vec),
        ]
        return "cuflash::flash_fwd_kernel<" + ", ".join(str(a) for a in args) + ">"

    @property
    def label(self) -> str:
        t = self.tile
        return (f"fwd {self.dtype:8s} d{self.head_dim:<3d} dv{self.head_dim_v:<3d} "
                f"{'causal' if self.causal else 'full  '} {'vec' if self.vec else 'scl'} "
                f"sm_{self.arch} {t.block_m}x{t.block_n} w{t.num_warps} s{t.stages}")


def _cbool(b: bool) -> str:
    return "true" if b else "false"


def fwd_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, vec: bool,
             arch: int, tile: FwdTile | None = None) -> FwdSpec:
    """The forward specialisation for real head dims ``head_dim`` / ``head_dim_v``."""
    d, dv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    if tile is None:
        tile = FWD_TILES[max(d, dv)]
    return FwdSpec(dtype, d, dv, bool(causal), bool(vec), int(arch), tile)


def shipped_fwd_specs(archs=SHIPPED_ARCHS) -> list[FwdSpec]:
    """Every forward specialisation that the dispatcher can pick (head_dim_v == head_dim)."""
    return [
        fwd_spec(dtype, d, d, causal, vec, arch)
        for arch, dtype, d, causal, vec in itertools.product(
            archs, DTYPES, HEAD_DIM_BUCKETS, (False, True), (True, False))
    ]


# --------------------------------------------------------------------------- sources


def kernel_dir() -> Path:
    """Absolute path of the kernel sources (installed package or source tree)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels", here.parent / "kernels"):
        if (cand / "flash_fwd.cu").is_file():
            return cand
    raise FileNotFoundError("cuflash kernel sources (kernels/flash_fwd.cu) not found")


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """Hash of every kernel source: CuPy's disk cache keys on the main file's text and
    the options, not on included headers, so this goes into the options."""
    h = hashlib.sha256()
    for p in sorted(kernel_dir().glob("*.cu*")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def source_text(name: str = "flash_fwd.cu") -> str:
    return (kernel_dir() / name).read_text()


def compile_options() -> tuple[str, ...]:
    """NVRTC options shared by the run-time compile and the CI compile-all (arch apart)."""
    return (
        "-std=c++17",
        f"-I{kernel_dir()}",
        f"-DCUFLASH_SOURCE_HASH=0x{source_hash()}ull",
    )
