"""Specialisation choice, template names and the source hash (CPU, no CuPy needed)."""

import shutil

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
        f"{t.num_warps}, {t.stages}, {t.min_blocks}, true, true>")
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
    assert len(specs) == len(_kernels.SHIPPED_ARCHS) * 2 * len(_kernels.HEAD_DIM_BUCKETS) * 2 * 2


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
