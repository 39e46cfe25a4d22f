"""Specialisation choice, template names and the source hash (CPU, no CuPy needed)."""

import itertools
import shutil

import numpy as np
import pytest

from cuflash import _kernels


@pytest.mark.parametrize("d, bucket", [(1, 32), (32, 32), (33, 64), (40, 64), (80, 96),
                                       (96, 96), (100, 128), (192, 192), (256, 256)])
def test_head_dim_bucket(d, bucket):
    assert _kernels.head_dim_bucket(d) == bucket


def test_head_dim_too_large():
    with pytest.raises(ValueError, match="at most 256"):
        _kernels.head_dim_bucket(257)


def test_spec_name_and_smem():
    spec = _kernels.fwd_spec("bfloat16", 80, 80, True, True, 90)
    t = spec.tile
    assert spec.head_dim == 96
    assert spec.name_expression == (
        f"cuflash::flash_fwd_kernel<cuflash::bf16_t, 96, 96, {t.block_m}, {t.block_n}, "
        f"{t.num_warps}, {t.stages}, {t.min_blocks}, true, true, false, false>")
    assert _kernels.fwd_spec("bfloat16", 80, 80, True, True, 90, options=True).name_expression \
        .endswith("true, true, true, false>")
    drop = _kernels.fwd_spec("bfloat16", 80, 80, True, True, 90, dropout=True)
    assert drop.options and drop.name_expression.endswith("true, true, true, true>")
    assert spec.smem_bytes == t.block_m * 96 * 2 + t.stages * t.block_n * 192 * 2
    assert spec.threads == 32 * t.num_warps


def test_every_bucket_has_a_tile_and_fits_h100_smem():
    for d in _kernels.HEAD_DIM_BUCKETS:
        tile = _kernels.FWD_TILES[d]
        assert tile.block_m % (16 * tile.num_warps) == 0
        assert tile.smem_bytes(d, d) <= 227 * 1024


def test_shipped_specs_are_unique_and_complete():
    specs = _kernels.shipped_fwd_specs()
    names = {(s.arch, s.name_expression) for s in specs}
    assert len(names) == len(specs)
    # archs x dtypes x buckets x causal x vec x options
    assert len(specs) == len(_kernels.SHIPPED_ARCHS) * 2 * 2 * 3 * sum(
        len(_kernels.head_dim_buckets(dt)) for dt in _kernels.DTYPES)


def test_source_hash_covers_headers(tmp_path, monkeypatch):
    """An edited header must change the compile options (CuPy's cache key)."""
    src = _kernels.kernel_dir()
    dst = tmp_path / "kernels"
    shutil.copytree(src, dst)
    monkeypatch.setattr(_kernels, "kernel_dir", lambda: dst)
    _kernels.source_hash.cache_clear()
    try:
        before = _kernels.compile_options()
        (dst / "softmax.cuh").write_text((dst / "softmax.cuh").read_text() + "\n// edit\n")
        _kernels.source_hash.cache_clear()
        after = _kernels.compile_options()
        assert before != after
        assert f"-I{dst}" in after and dst.is_absolute()
    finally:
        _kernels.source_hash.cache_clear()


# --------------------------------------------------------------------------- backward

_SMEM_H100 = 227 * 1024  # sm_90 (and sm_80: 163 KB) opt-in limit per block
_SMEM_SM86 = 99 * 1024   # sm_86 / sm_89: what the fallback tiles are for


def test_shipped_bwd_specs_are_unique_and_complete():
    specs = _kernels.shipped_bwd_specs()
    keys = [(s.arch, s.name_expression, getattr(s, "tile", None)) for s in specs]
    assert len(set(keys)) == len(keys)
    # the template arguments carry the tile, so the name alone is unique per arch
    assert len({(s.arch, s.name_expression) for s in specs}) == len(specs)
    assert {s.arch for s in specs} == set(_kernels.SHIPPED_ARCHS)
    fallback_arch = _kernels.SHIPPED_ARCHS[0]
    for arch in _kernels.SHIPPED_ARCHS:
        mine = [s for s in specs if s.arch == arch]
        prep = {s.dtype for s in mine if isinstance(s, _kernels.BwdPrepSpec)}
        assert prep == set(_kernels.DTYPES)
        for dtype, d, causal, vec, (opt, drop) in (
                (dt, *rest) for dt in _kernels.DTYPES for rest in itertools.product(
                    _kernels.head_dim_buckets(dt), (False, True), (True, False),
                    _kernels.KERNEL_FAMILIES)):
            for atomic in (True, False):
                tiles = _kernels.bwd_tiles(d, atomic, opt, dtype)
                want = tiles if arch == fallback_arch else tiles[:1]
                got = [s.tile for s in mine if isinstance(s, _kernels.BwdSpec)
                       and (s.dtype, s.head_dim, s.head_dim_v, s.causal, s.vec, s.atomic_dq,
                            s.options, s.dropout) == (dtype, d, d, causal, vec, atomic, opt, drop)]
                assert got == want, (arch, dtype, d, causal, vec, atomic, opt)
            dq_tiles = _kernels.bwd_dq_tiles(d, opt, dtype)
            want = dq_tiles if arch == fallback_arch else dq_tiles[:1]
            got = [s.tile for s in mine if isinstance(s, _kernels.BwdDqSpec)
                   and (s.dtype, s.head_dim, s.head_dim_v, s.causal, s.vec, s.options, s.dropout)
                   == (dtype, d, d, causal, vec, opt, drop)]
            assert got == want, (arch, dtype, d, causal, vec, opt)


def test_bwd_spec_name():
    spec = _kernels.bwd_spec("float16", 80, 80, True, False, 80, True)
    t = spec.tile
    assert spec.head_dim == spec.head_dim_v == 96 and spec.atomic_dq
    assert spec.name_expression == (
        f"cuflash::flash_bwd_kernel<cuflash::f16_t, 96, 96, {t.block_m}, {t.block_n}, "
        f"{t.num_warps}, {t.d_split}, {t.stages}, {t.min_blocks}, true, false, true, "
        f"{'true' if t.swap else 'false'}, false, false>")
    assert spec.threads == 32 * t.num_warps


@pytest.mark.parametrize("d", _kernels.HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("atomic", [True, False], ids=["atomic-dq", "dk-dv"])
def test_every_bucket_has_bwd_tiles_that_fit_h100(d, atomic):
    tiles = _kernels.bwd_tiles(d, atomic)
    assert tiles and tiles[0] == _kernels.BWD_TILES[d][0 if atomic else 1]
    spec = _kernels.bwd_spec("bfloat16", d, d, False, True, 90, atomic)
    assert spec.tile == tiles[0]
    assert spec.smem_bytes <= _SMEM_H100
    for t in tiles:  # what BwdTraits static_asserts
        key_warps = t.num_warps // t.d_split
        assert t.num_warps % t.d_split == 0 and t.block_n % (16 * key_warps) == 0
        assert (d // t.d_split) % 16 == 0 and t.block_m % 32 == 0 and t.stages in (1, 2)
        assert not t.swap or (t.d_split == 2 and t.block_m % 64 == 0)
    dq = _kernels.bwd_dq_spec("bfloat16", d, d, False, True, 90)
    assert dq.smem_bytes <= _SMEM_H100


def _bwd_chain_smem(d, atomic):
    return [_kernels.bwd_spec("float16", d, d, True, True, 80, atomic, tile=t).smem_bytes
            for t in _kernels.bwd_tiles(d, atomic)]


def test_smaller_tiles_order():
    t = _kernels.BwdTile(64, 128, 8, 1, 2, 1)
    assert _kernels._smaller(t) == [_kernels.BwdTile(64, 128, 8, 1, 1, 1),
                                    _kernels.BwdTile(32, 128, 8, 1, 1, 1)]
    assert _kernels._smaller(_kernels.BwdTile(32, 64, 8, 2, 1, 1)) == []
    # swapping pairs need 64 queries: their fallback is one warp per key slab
    assert _kernels._smaller(_kernels.BwdTile(64, 128, 8, 2, 2, 1, swap=True)) == [
        _kernels.BwdTile(32, 128, 8, 1, 1, 1)]


@pytest.mark.parametrize("atomic", (True, False), ids=("atomic-dq", "dk-dv"))
@pytest.mark.parametrize("d", _kernels.HEAD_DIM_BUCKETS)
def test_bwd_fallback_chain_fits_sm86(d, atomic):
    """The sm_80 fallback chain (_kernels._smaller) needs less shared memory at each step
    and ends in a tile that fits the 99 KB of sm_86/sm_89. Where the atomic-dQ chain does
    not (head dim 256), the dispatcher runs the deterministic kernels, which must fit."""
    smem = _bwd_chain_smem(d, atomic)
    assert smem == sorted(smem, reverse=True) and len(set(smem)) == len(smem)
    if atomic and smem[-1] > _SMEM_SM86:
        assert _bwd_chain_smem(d, False)[-1] <= _SMEM_SM86
    else:
        assert smem[-1] <= _SMEM_SM86, smem


@pytest.mark.parametrize("d", _kernels.HEAD_DIM_BUCKETS)
def test_bwd_dq_pass_fallback_fits_sm86(d):
    smem = [_kernels.bwd_dq_spec("float16", d, d, True, True, 80, tile=t).smem_bytes
            for t in _kernels.bwd_dq_tiles(d)]
    assert smem == sorted(smem, reverse=True)
    assert smem[-1] <= _SMEM_SM86, smem


# ------------------------------------------------------- dQ accumulator fragment order


def _cpp_dq_layout(spec):
    """(block_m, mrep, cols, warps_m) as BwdTraits (kernels/mainloop_bwd.cuh) computes
    kDQWarpsM, kDQWarpsN (DqWarpsN), kDQMRep and kDQCols."""
    t, hd = spec.tile, spec.head_dim
    warps_m = t.block_m // 32 if t.block_m // 32 < t.num_warps else t.num_warps
    warps_n = t.num_warps // warps_m
    while warps_n > 1 and hd % (16 * warps_n) != 0:
        warps_n -= 1
    return t.block_m, t.block_m // 16 // warps_m, hd // warps_n, warps_m


def _dq_accum_offset(row, col, block_m, mrep, cols, warps_m, head_dim_pad):
    """Where dQ element (row, col) sits in the float32 buffer (the order that
    DqAccumLayout in kernels/flash_bwd_prep.cu describes); works on int arrays."""
    tile = row // block_m
    rr = row - tile * block_m
    wm = rr // (16 * mrep)
    r = (rr >> 4) % mrep
    h = (rr >> 3) & 1
    g = rr & 7
    wn = col // cols
    cc = col - wn * cols
    warp = wm + wn * warps_m
    lane = g * 4 + ((cc & 7) >> 1)
    frag = (warp * mrep + r) * (cols // 8) + (cc >> 3)
    return tile * block_m * head_dim_pad + frag * 128 + lane * 4 + h * 2 + (cc & 1)


def _dq_accum_position(quad, block_m, mrep, cols, warps_m, head_dim_pad):
    """Mirror of DqAccumLayout::position (kernels/flash_bwd_prep.cu): (row, col) of the
    first element of float4 number ``quad``; works on int arrays."""
    per_tile = block_m * head_dim_pad // 4
    tile, q = quad // per_tile, quad % per_tile
    frag, lane = q >> 5, q & 31
    n, wr = frag % (cols // 8), frag // (cols // 8)
    r, warp = wr % mrep, wr // mrep
    wm, wn = warp % warps_m, warp // warps_m
    return (tile * block_m + wm * 16 * mrep + r * 16 + (lane >> 2),
            wn * cols + n * 8 + (lane & 3) * 2)


def _dq_buffer_specs(sm90: bool = True):
    """The shipped backward kernels that add into the float32 dQ buffer: the portable
    atomic-dQ ones and (sm90) the sm_90a ones, which share its order (dq_layout)."""
    specs = list(_kernels.shipped_bwd_specs())
    if sm90:
        specs += [s for s in _kernels.shipped_sm90_specs() if isinstance(s, _kernels.Sm90BwdSpec)]
    return [s for s in specs if isinstance(s, _kernels.Sm90BwdSpec) or
            getattr(s, "atomic_dq", False)]


def _atomic_bwd_layouts():
    """Every distinct (head_dim, tile) among the portable atomic-dQ main kernels."""
    seen = {}
    for s in _dq_buffer_specs(sm90=False):
        seen.setdefault((s.head_dim, s.tile), s)
    return [pytest.param(s, id=f"d{s.head_dim}-m{s.tile.block_m}-w{s.tile.num_warps}-"
                               f"s{s.tile.stages}") for s in seen.values()]


@pytest.mark.parametrize("spec", _atomic_bwd_layouts())
def test_dq_accum_layout_is_a_permutation(spec):
    layout = spec.dq_layout
    assert layout == _cpp_dq_layout(spec)
    block_m, mrep, cols, warps_m = layout
    hd = spec.head_dim
    assert cols % 16 == 0 and block_m % (16 * warps_m) == 0 and hd % cols == 0
    # two row tiles: the second must land right after the first
    rows, cc = np.meshgrid(np.arange(2 * block_m), np.arange(hd), indexing="ij")
    off = _dq_accum_offset(rows, cc, *layout, hd)
    assert off.dtype.kind == "i"
    np.testing.assert_array_equal(np.sort(off[:block_m].ravel()), np.arange(block_m * hd))
    np.testing.assert_array_equal(off[block_m:], off[:block_m] + block_m * hd)


def _every_dq_layout():
    """Every distinct dQ buffer order (layout, head dim) among the shipped kernels."""
    seen = {(s.dq_layout, s.head_dim) for s in _dq_buffer_specs()}
    return [pytest.param(layout, hd, id=f"{layout}-d{hd}") for layout, hd in sorted(seen)]


@pytest.mark.parametrize("layout, hd", _every_dq_layout())
def test_dq_conversion_reads_each_float4_where_the_writer_put_it(layout, hd):
    """The conversion kernel's position() (a thread per float4) is the inverse of the
    buffer order: the four floats of float4 q are elements (row, col), (row, col + 1),
    (row + 8, col), (row + 8, col + 1), at offsets 4q .. 4q + 3."""
    block_m = layout[0]
    quads = np.arange(2 * block_m * hd // 4)  # two row tiles
    row, col = _dq_accum_position(quads, *layout, hd)
    for e, (dr, dc) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
        np.testing.assert_array_equal(_dq_accum_offset(row + dr, col + dc, *layout, hd),
                                      4 * quads + e)


def _dq_writer(layout, head_dim):
    """Mirror of BwdMainloop::accumulate_dq (kernels/mainloop_bwd.cuh): for each float
    that a warp's red_add_f32x4 writes, (offset in the tile, row, col). Element e of an
    m16n8 C fragment sits at row g + 8 (e >> 1), col 2 t + (e & 1), g = lane >> 2,
    t = lane & 3."""
    block_m, mrep, cols, warps_m = layout
    warps_n = head_dim // cols
    for warp in range(warps_m * warps_n):  # warps beyond these sit the product out
        row0 = (warp % warps_m) * mrep * 16
        col0 = (warp // warps_m) * cols
        for lane in range(32):
            dst = warp * (mrep * cols * 16) + lane * 4
            g, t = lane >> 2, lane & 3
            for r in range(mrep):
                for n in range(cols // 8):
                    frag = dst + (r * (cols // 8) + n) * 128
                    for e in range(4):
                        row = row0 + r * 16 + g + 8 * (e >> 1)
                        col = col0 + n * 8 + 2 * t + (e & 1)
                        yield frag + e, row, col


def _dq_pieces(layout):
    """The (slab r, n8 tile) pairs that the chunked path of accumulate_dq covers: piece
    p is slab p % mrep, columns c = p // mrep * chunk .. + chunk."""
    _, mrep, cols, _ = layout
    chunk = 32 if cols % 32 == 0 else 16
    pieces = mrep * (cols // chunk)
    out = []
    for piece in range(pieces):
        r, c = piece % mrep, piece // mrep * chunk
        out += [(r, c // 8 + n) for n in range(chunk // 8)]
    return out


def _writer_cases():
    cases = []
    for d in (64, 96, 128, 160, 256):
        for t in _kernels.bwd_tiles(d, True):
            spec = _kernels.bwd_spec("float16", d, d, False, True, 80, True, tile=t)
            cases.append(pytest.param(spec, id=f"d{d}-m{t.block_m}-s{t.stages}"))
    assert {c.values[0].tile.block_m for c in cases} == {32, 64}
    return cases


@pytest.mark.parametrize("spec", _writer_cases())
def test_dq_accum_writer_matches_reader(spec):
    layout, hd = spec.dq_layout, spec.head_dim
    block_m, mrep, cols, _ = layout
    seen = np.zeros((block_m, hd), np.int64)
    for off, row, col in _dq_writer(layout, hd):
        assert 0 <= row < block_m and 0 <= col < hd
        assert _dq_accum_offset(row, col, *layout, hd) == off, (row, col)
        seen[row, col] += 1
    assert (seen == 1).all()  # every element written exactly once
    # the chunked path (pieces) covers the same fragments, each once
    pieces = _dq_pieces(layout)
    assert sorted(pieces) == [(r, n) for r in range(mrep) for n in range(cols // 8)]


def test_select_bwd_switches_to_deterministic_where_atomic_tiles_do_not_fit(monkeypatch):
    from cuflash import _dispatch

    monkeypatch.setattr(_dispatch, "max_smem_per_block", lambda: 99 * 1024)
    _, main, dq = _dispatch.select_bwd_specs("float16", 256, 256, True, True, 86, False)
    assert not main.atomic_dq and dq is not None and main.smem_bytes <= 99 * 1024
    _, main, dq = _dispatch.select_bwd_specs("float16", 128, 128, True, True, 86, False)
    assert main.atomic_dq and dq is None and main.smem_bytes <= 99 * 1024


def test_spec_selection_is_memoised_per_device(monkeypatch):
    """forward() and backward() pick specs through _selected: the selector's own result,
    with the device's arch in its place, computed once per (arguments, device)."""
    import types

    from cuflash import _dispatch

    device = types.SimpleNamespace(id=0)
    stub = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: device))
    monkeypatch.setattr(_dispatch, "_cupy", lambda: stub)
    monkeypatch.setattr(_dispatch, "device_arch", lambda: 80)
    monkeypatch.setattr(_dispatch, "max_smem_per_block", lambda: 163 * 1024)
    monkeypatch.setattr(_dispatch, "_spec_cache", {})
    calls = []

    def counting(select):
        def run(*args, **kwargs):
            calls.append(select.__name__)
            return select(*args, **kwargs)
        run.__name__ = select.__name__
        return run

    fwd, bwd = counting(_dispatch.select_fwd_spec), counting(_dispatch.select_bwd_specs)
    for _ in range(3):
        got = _dispatch._selected(fwd, "float16", 64, 64, True, True)
        assert got == _dispatch.select_fwd_spec("float16", 64, 64, True, True, 80)
        got = _dispatch._selected(bwd, "bfloat16", 128, 128, False, True, deterministic=True)
        assert got == _dispatch.select_bwd_specs("bfloat16", 128, 128, False, True, 80, True)
    assert calls == ["select_fwd_spec", "select_bwd_specs"]
    device.id = 1  # another device: chosen again
    _dispatch._selected(fwd, "float16", 64, 64, True, True)
    assert calls[-1] == "select_fwd_spec" and len(calls) == 3


_SMEM_A100 = 163 * 1024


@pytest.mark.parametrize("d", _kernels.head_dim_buckets("float32"))
def test_float32_tiles_fit_a100_and_the_traits(d):
    """float32 (tf32) tiles: what the traits static_assert, and an A100 block's shared
    memory (they have no smaller fallbacks)."""
    for causal, opt in ((False, False), (True, True)):
        fwd = _kernels.fwd_spec("float32", d, d, causal, True, 80, options=opt)
        assert fwd.tile == _kernels.FWD_F32_TILES[d] and fwd.smem_bytes <= _SMEM_A100
        assert fwd.tile.block_m % (16 * fwd.tile.num_warps) == 0
        for atomic in (True, False):
            spec = _kernels.bwd_spec("float32", d, d, causal, True, 80, atomic, options=opt)
            t = spec.tile
            assert _kernels.bwd_tiles(d, atomic, opt, "float32") == [t] and not t.swap
            assert spec.smem_bytes <= _SMEM_A100
            key_warps = t.num_warps // t.d_split
            assert t.block_n % (16 * key_warps) == 0 and (d // t.d_split) % 16 == 0
            assert _kernels.BWD_ROW_PAD % t.block_m == 0
        dq = _kernels.bwd_dq_spec("float32", d, d, causal, True, 80, options=opt)
        assert dq.smem_bytes <= _SMEM_A100
        assert dq.tile.block_m % (16 * dq.tile.num_warps) == 0
    # the smem formulas count 4 bytes an element
    t = _kernels.FWD_F32_TILES[d]
    assert fwd.smem_bytes == t.block_m * d * 4 + t.stages * t.block_n * 2 * d * 4


def test_float32_has_no_224_bucket():
    assert _kernels.head_dim_bucket(200, "float32") == 256
    assert _kernels.head_dim_bucket(200, "bfloat16") == 224
    assert _kernels.fwd_spec("float32", 200, 200, False, True, 90).head_dim == 256
