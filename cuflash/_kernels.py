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

DTYPES = ("float16", "bfloat16", "float32")

_ELEM_TAG = {"float16": "cuflash::f16_t", "bfloat16": "cuflash::bf16_t",
             "float32": "cuflash::f32_t"}

#: Bytes per element; the kernels address every array in 16-bit units (kernels/common.cuh).
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class FwdTile:
    """Forward tiling: rows per block, keys per step, warps, K/V stages, blocks per SM."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int
    min_blocks: int

    def smem_bytes(self, head_dim: int, head_dim_v: int, elem_bytes: int = 2) -> int:
        q_bytes = self.block_m * max(head_dim, head_dim_v) * elem_bytes
        kv_bytes = self.block_n * (head_dim + head_dim_v) * elem_bytes
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


# Where the options kernels (window, softcap, ALiBi; kernels/scores.cuh) need a tile of
# their own: the d128 tile has no registers to spare for the ALiBi distances (the
# 64x128 tile was the fastest of seven in tools/tune_fwd.py --options, docs/perf-log.md).
FWD_OPTION_TILES = {
    128: FwdTile(64, 128, 4, 1, 2),
}

# float32 inputs (tf32 products): P's fragments take twice the registers of fp16 pairs and
# every tile twice the shared memory, so the tiles are smaller; one table serves the plain
# and the options kernels, and every tile fits the 163 KB of an A100 block.
FWD_F32_TILES = {
    32: FwdTile(64, 64, 4, 2, 2),
    64: FwdTile(64, 32, 4, 1, 2),  # (64x64 spills 8 bytes in the options kernels)
    96: FwdTile(64, 32, 4, 1, 2),
    128: FwdTile(64, 32, 4, 1, 2),
    160: FwdTile(64, 32, 4, 1, 1),
    192: FwdTile(64, 32, 4, 1, 1),
    256: FwdTile(64, 32, 4, 1, 1),
}


def fwd_tile(dtype: str, bucket: int, options: bool) -> FwdTile:
    """The forward tile of a dtype and head-dim bucket."""
    if dtype == "float32":
        return FWD_F32_TILES[bucket]
    return (FWD_OPTION_TILES if options else FWD_TILES).get(bucket, FWD_TILES[bucket])


#: (options, dropout) of the three kernel families: plain, options, options with dropout.
KERNEL_FAMILIES = ((False, False), (True, False), (True, True))


def head_dim_buckets(dtype: str = "float16") -> tuple[int, ...]:
    """The head-dim buckets of a dtype. float32 has no 224 bucket: its backward tile there
    spills (the dQ product splits into 14 pieces), so 193..256 run the 256 kernels."""
    if dtype == "float32":
        return tuple(b for b in HEAD_DIM_BUCKETS if b != 224)
    return HEAD_DIM_BUCKETS


def head_dim_bucket(d: int, dtype: str = "float16") -> int:
    """The smallest bucket of ``dtype`` that holds head dim ``d`` (1 <= d <= 256)."""
    for b in head_dim_buckets(dtype):
        if d <= b:
            return b
    raise ValueError(f"head dim must be at most {HEAD_DIM_BUCKETS[-1]}, got {d}")


@dataclasses.dataclass(frozen=True)
class _KernelSpec:
    """What every attention kernel specialisation has: element type, head-dim buckets,
    causal, 16-byte copies (vec), arch, a tile, and ``options``: whether the kernel takes
    the API's window, softcap and ALiBi options (run-time values; kernels/scores.cuh).
    Subclasses name the source, the template and the tile's template arguments."""

    dtype: str
    head_dim: int
    head_dim_v: int
    causal: bool
    vec: bool
    arch: int
    tile: object
    options: bool = False
    dropout: bool = False  # an options kernel with dropout's code as well (kDropout)

    kind = ""
    template = ""

    @property
    def threads(self) -> int:
        return self.tile.num_warps * 32

    def _tile_args(self) -> list:
        # FwdTile's template arguments; BwdSpec has its own
        t = self.tile
        return [t.block_m, t.block_n, t.num_warps, t.stages, t.min_blocks]

    def _extra_args(self) -> list:
        return []

    @property
    def name_expression(self) -> str:
        args = [_ELEM_TAG[self.dtype], self.head_dim, self.head_dim_v, *self._tile_args(),
                _cbool(self.causal), _cbool(self.vec), *self._extra_args(),
                _cbool(self.options), _cbool(self.dropout)]
        return f"cuflash::{self.template}<" + ", ".join(str(a) for a in args) + ">"

    @property
    def label(self) -> str:
        return (f"{self.kind} {self.dtype:8s} d{self.head_dim:<3d} dv{self.head_dim_v:<3d} "
                f"{'causal' if self.causal else 'full  '} {'vec' if self.vec else 'scl'} "
                f"sm_{self.arch} {self.tile.block_m}x{self.tile.block_n} "
                f"w{self.tile.num_warps}{self._label_tail()}{' opt' if self.options else ''}"
                f"{'+drop' if self.dropout else ''}")

    def _label_tail(self) -> str:
        return f" s{self.tile.stages}"


@dataclasses.dataclass(frozen=True)
class FwdSpec(_KernelSpec):
    """One compiled forward kernel: everything that is a template argument, plus arch."""

    source = "flash_fwd.cu"
    kind = "fwd"
    template = "flash_fwd_kernel"

    @property
    def smem_bytes(self) -> int:
        return self.tile.smem_bytes(self.head_dim, self.head_dim_v, ELEM_BYTES[self.dtype])


def _cbool(b: bool) -> str:
    return "true" if b else "false"


def fwd_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, vec: bool,
             arch: int, tile: FwdTile | None = None, options: bool = False,
             dropout: bool = False) -> FwdSpec:
    """The forward specialisation for real head dims ``head_dim`` / ``head_dim_v``."""
    d, dv = head_dim_bucket(head_dim, dtype), head_dim_bucket(head_dim_v, dtype)
    if tile is None:
        tile = fwd_tile(dtype, max(d, dv), options)
    return FwdSpec(dtype, d, dv, bool(causal), bool(vec), int(arch), tile,
                   options=bool(options or dropout), dropout=bool(dropout))


def shipped_fwd_specs(archs=SHIPPED_ARCHS) -> list[FwdSpec]:
    """Every forward specialisation that the dispatcher can pick (head_dim_v == head_dim)."""
    return [
        fwd_spec(dtype, d, d, causal, vec, arch, options=options, dropout=dropout)
        for arch, dtype in itertools.product(archs, DTYPES)
        for d, causal, vec, (options, dropout) in itertools.product(
            head_dim_buckets(dtype), (False, True), (True, False), KERNEL_FAMILIES)
    ]


# --------------------------------------------------------------------------- backward


@dataclasses.dataclass(frozen=True)
class BwdTile:
    """Main backward tiling: queries per step, keys per block, warps, warps sharing a key
    slab (each with part of the dK/dV columns), query-tile buffers, blocks per SM."""

    block_m: int
    block_n: int
    num_warps: int
    d_split: int
    stages: int
    min_blocks: int
    swap: bool = False  # d_split pairs split S/dP by queries and swap P and dS halves

    def smem_bytes(self, head_dim: int, head_dim_v: int, atomic_dq: bool,
                   elem_bytes: int = 2) -> int:
        kv_bytes = self.block_n * (head_dim + head_dim_v) * elem_bytes
        ds_tiles = (2 if atomic_dq else int(self.swap)) + int(self.swap)  # dS buffers, P
        ds_bytes = self.block_n * self.block_m * elem_bytes * ds_tiles
        stage_bytes = self.block_m * (head_dim + head_dim_v) * elem_bytes + 2 * self.block_m * 4
        return kv_bytes + ds_bytes + self.stages * stage_bytes


# Keyed by head-dim bucket: (tile with atomic dQ, tile for dK/dV only). Each must compile
# without spills (tests/test_compile_all.py); the atomic dQ product needs more registers.
BWD_TILES = {
    32: (BwdTile(32, 128, 4, 1, 2, 1), BwdTile(32, 128, 4, 1, 2, 1)),
    64: (BwdTile(32, 128, 4, 1, 2, 1), BwdTile(64, 128, 8, 1, 2, 1)),
    96: (BwdTile(64, 128, 8, 1, 2, 1), BwdTile(64, 128, 8, 1, 2, 1)),
    128: (BwdTile(64, 128, 8, 2, 2, 1, swap=True), BwdTile(32, 128, 8, 1, 2, 1)),
    160: (BwdTile(32, 64, 8, 2, 2, 1), BwdTile(64, 64, 8, 2, 2, 1)),
    192: (BwdTile(64, 64, 8, 2, 2, 1), BwdTile(64, 64, 8, 2, 2, 1)),
    224: (BwdTile(32, 64, 8, 2, 2, 1), BwdTile(32, 64, 8, 2, 2, 1)),
    256: (BwdTile(32, 64, 8, 2, 2, 1), BwdTile(32, 64, 8, 2, 2, 1)),
}

# Where the options kernels need a tile of their own (as FWD_OPTION_TILES): at d64 the
# 4-warp atomic-dQ tile spills with them (bf16, sm_90); with dropout's code, so do the
# two-buffer dK/dV-only tiles at d96 and d192 (sm_90): one query buffer there, and at d192
# 32 queries a step (64 spilled 16 bytes in the scalar-load dropout kernel).
BWD_OPTION_TILES = {
    64: (BwdTile(64, 128, 8, 1, 2, 1), BwdTile(64, 128, 8, 1, 2, 1)),
    96: (BwdTile(64, 128, 8, 1, 2, 1), BwdTile(64, 128, 8, 1, 1, 1)),
    192: (BwdTile(32, 64, 8, 2, 2, 1), BwdTile(32, 64, 8, 2, 1, 1)),  # (64x64: scl spills)
}

# float32 (tf32): the same tile for atomic dQ and dK/dV only; no swap (16-bit pairs only).
# Above d = 64 several warps share each 16-key slab, each with part of the dK/dV columns.
BWD_F32_TILES = {
    **{d: (BwdTile(32, 64, 4, 1, 1, 1),) * 2 for d in (32, 64)},
    **{d: (BwdTile(32, 64, 8, 2, 1, 1),) * 2 for d in (96, 128)},
    **{d: (BwdTile(32, 32, 4, 2, 1, 1),) * 2 for d in (160, 192)},
    256: (BwdTile(32, 32, 8, 4, 1, 1),) * 2,  # four warps a key slab, 64 columns each
}

# The deterministic dQ pass: (block_m, block_n, warps, K/V stages, blocks per SM).
BWD_DQ_TILES = {
    32: FwdTile(128, 32, 4, 2, 1),
    64: FwdTile(128, 32, 4, 2, 1),
    96: FwdTile(128, 32, 4, 2, 1),
    128: FwdTile(64, 64, 4, 2, 1),
    160: FwdTile(64, 32, 4, 1, 1),  # one K/V buffer: with two, d160/d192 spill (their
    192: FwdTile(64, 32, 4, 1, 1),  # unrolled tile copies; 224 and up copy rolled)
    224: FwdTile(64, 32, 4, 2, 1),
    256: FwdTile(64, 32, 4, 2, 1),
}

# ... and for the options kernels, where the dQ tile above spills (d96, sm_90, scalar loads).
BWD_DQ_OPTION_TILES = {
    96: FwdTile(64, 64, 4, 2, 1),
}

BWD_DQ_F32_TILES = {
    **{d: FwdTile(64, 32, 4, 1, 1) for d in (32, 64, 96, 128)},
    **{d: FwdTile(32, 32, 2, 1, 1) for d in (160, 192, 256)},
}

#: Row statistics and the float32 dQ buffer are padded to a multiple of this many rows,
#: which every query tile (forward, backward, dQ pass) divides.
BWD_ROW_PAD = 128


@dataclasses.dataclass(frozen=True)
class BwdSpec(_KernelSpec):
    """One compiled main backward kernel (dK, dV; and dQ by atomics when atomic_dq)."""

    atomic_dq: bool = True

    source = "flash_bwd.cu"
    kind = "bwd"
    template = "flash_bwd_kernel"

    @property
    def smem_bytes(self) -> int:
        return self.tile.smem_bytes(self.head_dim, self.head_dim_v, self.atomic_dq,
                                    ELEM_BYTES[self.dtype])

    @property
    def dq_layout(self) -> tuple[int, int, int, int]:
        """(block_m, mrep, cols, warps_m) of the dQ warp tiles, as BwdTraits computes them:
        the fragment order of the float32 dQ buffer (kernels/flash_bwd_prep.cu)."""
        t = self.tile
        warps_m = min(t.block_m // 32, t.num_warps)
        warps_n = t.num_warps // warps_m
        while warps_n > 1 and self.head_dim % (16 * warps_n):
            warps_n -= 1
        return t.block_m, t.block_m // 16 // warps_m, self.head_dim // warps_n, warps_m

    def _tile_args(self) -> list:
        t = self.tile
        return [t.block_m, t.block_n, t.num_warps, t.d_split, t.stages, t.min_blocks]

    def _extra_args(self) -> list:
        return [_cbool(self.atomic_dq), _cbool(self.tile.swap)]

    def _label_tail(self) -> str:
        return (f" x{self.tile.d_split}{'swap' if self.tile.swap else ''} s{self.tile.stages} "
                f"{'atomic-dq' if self.atomic_dq else 'dk-dv'}")


@dataclasses.dataclass(frozen=True)
class BwdDqSpec(_KernelSpec):
    """One compiled deterministic dQ kernel."""

    source = "flash_bwd_dq.cu"
    kind = "bwd-dq"
    template = "flash_bwd_dq_kernel"

    @property
    def smem_bytes(self) -> int:
        # Q and dO stay; K and V are staged
        t, b = self.tile, ELEM_BYTES[self.dtype]
        return (t.block_m * (self.head_dim + self.head_dim_v) * b
                + t.stages * t.block_n * (self.head_dim + self.head_dim_v) * b)


@dataclasses.dataclass(frozen=True)
class BwdPrepSpec:
    """The element-wise kernels around the backward pass: preprocess and dQ conversion."""

    dtype: str
    arch: int

    source = "flash_bwd_prep.cu"
    threads = 256
    smem_bytes = 0
    rows_per_block = 8  # kPrepWarps: one warp per query row

    @property
    def name_expressions(self) -> tuple[str, str]:
        tag = _ELEM_TAG[self.dtype]
        return (f"cuflash::flash_bwd_preprocess_kernel<{tag}>",
                f"cuflash::flash_bwd_convert_dq_kernel<{tag}>")

    @property
    def name_expression(self) -> str:
        return self.name_expressions[0]

    @property
    def label(self) -> str:
        return f"bwd-prep {self.dtype:8s} sm_{self.arch}"


@dataclasses.dataclass(frozen=True)
class DropoutMaskSpec:
    """The debugging kernels that write the dropout keep mask (cuflash.dropout_mask) with
    the attention kernels' own code, in their two layouts (kernels/dropout_mask.cu)."""

    arch: int

    source = "dropout_mask.cu"
    threads = 32
    smem_bytes = 0
    name_expressions = ("cuflash::dropout_mask_kernel<false>",
                        "cuflash::dropout_mask_kernel<true>")

    @property
    def name_expression(self) -> str:
        return self.name_expressions[0]

    @property
    def label(self) -> str:
        return f"dropout-mask sm_{self.arch}"


def _smaller(tile):
    """Tiles that need less shared memory, in the order the dispatcher tries them (for
    parts with about 99 KB a block, e.g. sm_86 and sm_89): one buffer, then half the rows."""
    if tile.swap:  # the pairs need 64-query tiles: fall back to one warp per key slab
        return [BwdTile(32, tile.block_n, tile.num_warps, 1, 1, 1)]
    out = []
    if tile.stages == 2:
        out.append(dataclasses.replace(tile, stages=1))
    if tile.block_m > 32:
        out.append(dataclasses.replace(tile, block_m=32, stages=1))
    return out


def bwd_tiles(bucket: int, atomic_dq: bool, options: bool = False,
              dtype: str = "float16") -> list[BwdTile]:
    """Main backward tiles for a head-dim bucket: the tuned one first, then smaller ones."""
    if dtype == "float32":
        return [BWD_F32_TILES[bucket][0 if atomic_dq else 1]]  # (they fit an A100 block)
    tile = (BWD_OPTION_TILES if options else BWD_TILES).get(bucket, BWD_TILES[bucket])
    tile = tile[0 if atomic_dq else 1]
    return [tile, *_smaller(tile)]


def bwd_dq_tiles(bucket: int, options: bool = False, dtype: str = "float16") -> list[FwdTile]:
    if dtype == "float32":
        return [BWD_DQ_F32_TILES[bucket]]
    tile = (BWD_DQ_OPTION_TILES if options else BWD_DQ_TILES).get(bucket, BWD_DQ_TILES[bucket])
    return [tile] + ([dataclasses.replace(tile, stages=1)] if tile.stages == 2 else [])


def bwd_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, vec: bool, arch: int,
             atomic_dq: bool, tile: BwdTile | None = None, options: bool = False,
             dropout: bool = False) -> BwdSpec:
    d, dv = head_dim_bucket(head_dim, dtype), head_dim_bucket(head_dim_v, dtype)
    if tile is None:
        tile = bwd_tiles(max(d, dv), atomic_dq, options, dtype)[0]
    return BwdSpec(dtype, d, dv, bool(causal), bool(vec), int(arch), tile,
                   options=bool(options or dropout), dropout=bool(dropout),
                   atomic_dq=bool(atomic_dq))


def bwd_dq_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, vec: bool, arch: int,
                tile: FwdTile | None = None, options: bool = False,
                dropout: bool = False) -> BwdDqSpec:
    d, dv = head_dim_bucket(head_dim, dtype), head_dim_bucket(head_dim_v, dtype)
    if tile is None:
        tile = bwd_dq_tiles(max(d, dv), options, dtype)[0]
    return BwdDqSpec(dtype, d, dv, bool(causal), bool(vec), int(arch), tile,
                     options=bool(options or dropout), dropout=bool(dropout))


def shipped_bwd_specs(archs=SHIPPED_ARCHS, *, fallbacks: bool = True) -> list:
    """Every backward specialisation that the dispatcher can pick (head_dim_v == head_dim).

    With ``fallbacks``, also the smaller-shared-memory tiles, for the first arch only
    (sm_80 code; they are picked on sm_86/sm_89 parts)."""
    specs: list = []
    for arch, dtype in itertools.product(archs, DTYPES):
        specs.append(BwdPrepSpec(dtype, arch))
        n_tiles = None if fallbacks and arch == archs[0] else 1
        for d, causal, vec, (opt, drop) in itertools.product(
                head_dim_buckets(dtype), (False, True), (True, False), KERNEL_FAMILIES):
            for atomic in (True, False):
                specs += [bwd_spec(dtype, d, d, causal, vec, arch, atomic, tile=t, options=opt,
                                   dropout=drop)
                          for t in bwd_tiles(d, atomic, opt, dtype)[:n_tiles]]
            specs += [bwd_dq_spec(dtype, d, d, causal, vec, arch, tile=t, options=opt,
                                  dropout=drop)
                      for t in bwd_dq_tiles(d, opt, dtype)[:n_tiles]]
    return specs


# --------------------------------------------------------------------------- Hopper


@dataclasses.dataclass(frozen=True)
class Sm90FwdTile:
    """Hopper forward tiling: keys per step, consumer warpgroups (64 query rows each) and
    K/V stages of the copy engine's ring."""

    block_n: int
    consumers: int
    stages: int
    overlap: bool = True   # S_{j+1} = QK^T during the softmax of tile j
    pingpong: bool = True  # consumer warpgroups take turns at the tensor cores

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    @property
    def num_warps(self) -> int:
        return 4 * (self.consumers + 1)


#: Head dims of the sm_90a forward kernels (16-bit inputs); other head dims that are
#: whole 16-byte rows round up, as in the portable kernels. Tuned on the H200 with
#: tools/tune_sm90.py (docs/perf-log.md, h1-h3).
SM90_FWD_TILES = {
    64: Sm90FwdTile(128, 3, 2, overlap=False, pingpong=False),
    128: Sm90FwdTile(128, 2, 2, overlap=True, pingpong=False),
    192: Sm90FwdTile(96, 2, 2, overlap=True, pingpong=False),
    256: Sm90FwdTile(80, 2, 2, overlap=True, pingpong=False),
}
#: Causal persistent blocks (cuflash/_sm90.py) over at most this many key tiles
#: take a tile of their own: at d64 two consumer warpgroups with the overlap, instead of
#: three without (perf-log h21: +12% at L = 1k causal, but -6% at 2k; h24: with two Q
#: buffers, a full call at 1k is 3% faster on the three).
SM90_FWD_SHORT_TILES = {
    64: (8, Sm90FwdTile(128, 2, 2, overlap=True, pingpong=False)),
}


def sm90_persistent_fwd_tile(head_dim: int, key_tiles: int, causal: bool) -> Sm90FwdTile:
    """The tile of persistent sm_90a forward blocks of head-dim bucket ``head_dim`` whose
    tiles walk ``key_tiles`` key tiles: causal, one of SM90_FWD_SHORT_TILES, else the
    regular one."""
    short = SM90_FWD_SHORT_TILES.get(head_dim)
    if causal and short is not None and key_tiles <= short[0]:
        return short[1]
    return SM90_FWD_TILES[head_dim]


@dataclasses.dataclass(frozen=True)
class Sm90FwdSpec:
    """One sm_90a forward kernel (kernels/flash_fwd_sm90.cu): wgmma, TMA, a producer
    warpgroup; ``options``: window, softcap and ALiBi, ``dropout`` (with options) too; no
    packed sequences yet."""

    dtype: str
    head_dim: int
    causal: bool
    tile: Sm90FwdTile
    options: bool = False
    dropout: bool = False
    persistent: bool = False  # blocks that walk tiles from a counter

    source = "flash_fwd_sm90.cu"
    kind = "fwd90"
    arch = "90a"

    @property
    def threads(self) -> int:
        return self.tile.num_warps * 32

    @property
    def smem_bytes(self) -> int:
        """FwdTraits::kSmemBytes: 1024 bytes of alignment slack, Q (persistent at d64: two
        Q buffers), the K/V ring, its mbarriers and (persistent) Q empty's, two tile
        slots and the second Q buffer's two barriers (the kernel traps on a smaller
        launch)."""
        t = self.tile
        kv = t.block_n * self.head_dim * 2
        q_buffers = self.q_buffers
        barriers = 8 * (1 + 4 * t.stages) + (16 * q_buffers if self.persistent else 0)
        return 1024 + q_buffers * t.block_m * self.head_dim * 2 + 2 * t.stages * kv + barriers

    @property
    def q_buffers(self) -> int:
        """FwdTraits::kQBuffers: persistent blocks at d64 load the next tile's Q into a
        second buffer while the current tile runs (perf-log h23)."""
        return 2 if self.persistent and self.head_dim <= 64 else 1

    @property
    def name_expression(self) -> str:
        t = self.tile
        return (f"cuflash::sm90::flash_fwd_sm90_kernel<{_ELEM_TAG[self.dtype]}, {self.head_dim}, "
                f"{t.block_n}, {t.consumers}, {t.stages}, {_cbool(t.overlap)}, "
                f"{_cbool(t.pingpong)}, {_cbool(self.causal)}, {_cbool(self.options)}, "
                f"{_cbool(self.dropout)}, {_cbool(self.persistent)}>")

    @property
    def label(self) -> str:
        t = self.tile
        return (f"{self.kind} {self.dtype:8s} d{self.head_dim:<3d} "
                f"{'causal' if self.causal else 'full  '} sm_{self.arch} "
                f"{t.block_m}x{t.block_n} wg{t.consumers}+1 s{t.stages}"
                f"{' overlap' if t.overlap else ''}{' pingpong' if t.pingpong else ''}"
                f"{_option_tag(self.options, self.dropout)}"
                f"{' persistent' if self.persistent else ''}")


def _option_tag(options: bool, dropout: bool) -> str:
    return " +dropout" if dropout else (" +options" if options else "")


def sm90_fwd_spec(dtype: str, head_dim: int, causal: bool, options: bool = False,
                  dropout: bool = False, persistent: bool = False) -> Sm90FwdSpec | None:
    """The sm_90a forward kernel for real head dim ``head_dim``, or None where there is none
    (float32, head dims above the largest bucket)."""
    if dtype not in ("float16", "bfloat16"):
        return None
    for d in sorted(SM90_FWD_TILES):
        if head_dim <= d:
            return Sm90FwdSpec(dtype, d, bool(causal), SM90_FWD_TILES[d], bool(options),
                               bool(dropout), bool(persistent))
    return None


@dataclasses.dataclass(frozen=True)
class Sm90BwdSpec:
    """One sm_90a backward kernel (kernels/flash_bwd_sm90.cu): 128 keys a block in two
    consumer warpgroups, 64-query steps, dQ by atomics in the portable kernel's fragment
    order; ``options`` and ``dropout`` as in :class:`Sm90FwdSpec`; ``deterministic``: the
    blocks add to each dQ tile in a fixed order (their turns in an int32 buffer).
    Head dim 256 (``wide``): 64 keys a block, whose dK and dV columns the two warpgroups
    split (flash_bwd_sm90_wide_kernel)."""

    dtype: str
    head_dim: int
    causal: bool
    options: bool = False
    dropout: bool = False
    deterministic: bool = False

    source = "flash_bwd_sm90.cu"
    kind = "bwd90"
    arch = "90a"
    threads = 384
    #: (block_m, mrep, cols, warps_m) of its dQ fragments (BwdSpec.dq_layout)
    dq_layout = (64, 1, 64, 4)

    @property
    def wide(self) -> bool:
        return self.head_dim > 128

    @property
    def block_n(self) -> int:
        return 64 if self.wide else 128

    @property
    def smem_bytes(self) -> int:
        d, n = self.head_dim, self.block_n
        # K, V; two stages of Q_i, dO_i and their lse, delta; two dS^T buffers (wide: with
        # P^T beside each); barriers
        ds = 2 * n * 64 * 2 * (2 if self.wide else 1)
        return 1024 + 2 * n * d * 2 + 2 * 2 * (64 * d * 2 + 64 * 4) + ds + 128

    @property
    def name_expression(self) -> str:
        kernel = "flash_bwd_sm90_wide_kernel" if self.wide else "flash_bwd_sm90_kernel"
        return (f"cuflash::sm90::{kernel}<{_ELEM_TAG[self.dtype]}, "
                f"{self.head_dim}, {_cbool(self.causal)}, {_cbool(self.options)}, "
                f"{_cbool(self.dropout)}, {_cbool(self.deterministic)}>")

    @property
    def label(self) -> str:
        return (f"{self.kind} {self.dtype:8s} d{self.head_dim:<3d} "
                f"{'causal' if self.causal else 'full  '} sm_{self.arch} "
                f"64x{self.block_n} wg2+1"
                f"{_option_tag(self.options, self.dropout)}"
                f"{' deterministic' if self.deterministic else ''}")


SM90_BWD_HEAD_DIMS = (64, 128, 256)


def sm90_bwd_spec(dtype: str, head_dim: int, causal: bool, options: bool = False,
                  dropout: bool = False, deterministic: bool = False) -> Sm90BwdSpec | None:
    """The sm_90a backward kernel for real head dim ``head_dim``, or None where the portable
    kernels run (float32, head dims above 256)."""
    if dtype not in ("float16", "bfloat16"):
        return None
    for d in SM90_BWD_HEAD_DIMS:
        if head_dim <= d:
            return Sm90BwdSpec(dtype, d, bool(causal), bool(options), bool(dropout),
                               bool(deterministic))
    return None


def shipped_sm90_specs() -> list:
    return ([Sm90FwdSpec(dtype, d, causal, tile, options, dropout, persistent)
             for dtype in ("float16", "bfloat16") for d, tile in SM90_FWD_TILES.items()
             for causal in (False, True) for options, dropout in KERNEL_FAMILIES
             for persistent in (False, True)]
            + [Sm90FwdSpec(dtype, d, True, tile, options, dropout, True)
               for dtype in ("float16", "bfloat16") for d, (_, tile) in SM90_FWD_SHORT_TILES.items()
               for options, dropout in KERNEL_FAMILIES]
            + [Sm90BwdSpec(dtype, d, causal, options, dropout, deterministic)
               for dtype in ("float16", "bfloat16") for d in SM90_BWD_HEAD_DIMS
               for causal in (False, True) for options, dropout in KERNEL_FAMILIES
               for deterministic in (False, True)])


def shipped_specs(archs=SHIPPED_ARCHS) -> list:
    """Every specialisation, forward and backward, the dropout-mask kernels and the sm_90a
    kernels: what CI compiles."""
    return (shipped_fwd_specs(archs) + shipped_bwd_specs(archs)
            + [DropoutMaskSpec(arch) for arch in archs] + shipped_sm90_specs())


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
    for p in sorted(kernel_dir().rglob("*.cu*")):
        h.update(p.relative_to(kernel_dir()).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def source_text(name: str = "flash_fwd.cu") -> str:
    return (kernel_dir() / name).read_text()


#: Extra NVRTC options, for probes that time a kernel with one stage left out
#: (tools/probe_bwd.py); empty in normal use.
EXTRA_OPTIONS: list[str] = []


def compile_options() -> tuple[str, ...]:
    """NVRTC options shared by the run-time compile and the CI compile-all (arch apart)."""
    return (
        "-std=c++17",
        f"-I{kernel_dir()}",
        f"-DCUFLASH_SOURCE_HASH=0x{source_hash()}ull",
        *EXTRA_OPTIONS,
    )
