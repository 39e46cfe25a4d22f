"""Which calls the sm_90a kernels take (cuflash/_sm90.py), on stand-in arrays: no GPU
needed. Everything else must fall back to the portable kernels."""

import numpy as np
import pytest

from cuflash import _kernels, _sm90


class FakeArray:
    """What the eligibility checks read of a CuPy array: shape, byte strides, dtype and
    the device address."""

    def __init__(self, shape, dtype="float16", strides=None, ptr=1 << 20):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        item = self.dtype.itemsize
        if strides is None:
            strides, acc = [], item
            for n in reversed(self.shape):
                strides.insert(0, acc)
                acc *= n
        self.strides = tuple(strides)
        self.data = type("Ptr", (), {"ptr": ptr})()


def fwd(q, k=None, v=None, out=None, **kw):
    k = k or FakeArray(q.shape, q.dtype)
    v = v or FakeArray(k.shape, q.dtype)
    out = out or FakeArray(q.shape, q.dtype)
    args = dict(causal=False, scale=0.125, options_kernel=False, dropout_kernel=False,
                packed=None)
    args.update(kw)
    return _sm90.fwd_spec_for(q, k, v, out, **args)


def bwd(q, k=None, **kw):
    k = k or FakeArray(q.shape, q.dtype)
    args = dict(causal=True, scale=0.125, options_kernel=False, dropout_kernel=False,
                packed=None, deterministic=False)
    args.update(kw)
    x = FakeArray(q.shape, q.dtype)
    return _sm90.bwd_spec_for(q, k, FakeArray(k.shape, q.dtype), x, FakeArray(k.shape, q.dtype),
                              FakeArray(k.shape, q.dtype), **args)


def test_plain_16bit_calls_take_the_hopper_kernels():
    for dtype in ("float16", "bfloat16"):
        for d, bucket in ((40, 64), (64, 64), (96, 128), (128, 128), (200, 256)):
            spec = fwd(FakeArray((2, 4, 300, d), dtype))
            assert spec is not None and spec.head_dim == bucket and spec.dtype == dtype
        spec = bwd(FakeArray((2, 4, 300, 128), dtype))
        assert spec is not None and spec.head_dim == 128 and spec.causal


@pytest.mark.parametrize("dropout", (False, True))
def test_option_calls_take_the_hopper_kernels(dropout):
    q = FakeArray((2, 4, 300, 64), "bfloat16")
    for spec in (fwd(q, options_kernel=True, dropout_kernel=dropout),
                 bwd(q, options_kernel=True, dropout_kernel=dropout)):
        assert spec is not None and spec.options and spec.dropout == dropout
        tag = "true, true" if dropout else "true, false"  # (options, dropout)
        assert f"{tag}, " in spec.name_expression
    assert not fwd(q).options and not bwd(q).dropout


def test_forward_takes_persistent_blocks(monkeypatch):
    """Persistent blocks at every length (FWD_PERSISTENT_MAX_KEY_TILES None; an int caps
    the key tiles a tile may walk in them, d128: 128 keys each), one tile a block past the
    cap or with CUFLASH_SM90_PERSISTENT=0."""
    short, long = FakeArray((2, 4, 2048, 128), "bfloat16"), FakeArray((2, 4, 2049, 128), "bfloat16")
    longest = FakeArray((1, 4, 65536, 128), "bfloat16")
    assert all(fwd(x).persistent for x in (short, long, longest))
    assert "true>" in fwd(long).name_expression
    monkeypatch.setattr(_sm90, "FWD_PERSISTENT_MAX_KEY_TILES", 16)
    assert fwd(short).persistent and not fwd(long).persistent
    assert "false>" in fwd(long).name_expression
    assert fwd(short).q_buffers == fwd(long).q_buffers == 1
    assert fwd(short).smem_bytes == fwd(long).smem_bytes + 16  # Q empty, two tile slots
    monkeypatch.setattr(_sm90, "FWD_PERSISTENT_MAX_KEY_TILES", None)
    # d64: causal persistent blocks over at most 8 key tiles have a tile of their own (two
    # warpgroups, the overlap); longer ones and full calls the regular tile
    shortest, short64, long64 = (FakeArray((2, 4, n, 64), "bfloat16") for n in (1024, 1025, 16384))
    assert (fwd(shortest, causal=True).tile == _kernels.SM90_FWD_SHORT_TILES[64][1]
            != _kernels.SM90_FWD_TILES[64])
    assert fwd(shortest).persistent and fwd(shortest).tile == _kernels.SM90_FWD_TILES[64]
    assert fwd(short64).persistent and fwd(short64).tile == _kernels.SM90_FWD_TILES[64]
    assert fwd(short64, causal=True).tile == _kernels.SM90_FWD_TILES[64]
    assert fwd(long64).persistent and fwd(long64).tile == _kernels.SM90_FWD_TILES[64]
    # d64 persistent blocks load the next tile's Q into a second buffer: its bytes and the
    # barriers Q empty, two tile slots, the second buffer's Q full and Q empty
    monkeypatch.setattr(_sm90, "FWD_PERSISTENT", False)
    one_tile = fwd(long64)
    assert not one_tile.persistent and fwd(shortest).persistent is False
    monkeypatch.setattr(_sm90, "FWD_PERSISTENT", True)
    spec = fwd(long64)
    assert spec.q_buffers == 2 and one_tile.q_buffers == 1
    assert spec.smem_bytes == one_tile.smem_bytes + spec.tile.block_m * 64 * 2 + 32
    shipped = _kernels.shipped_sm90_specs()
    assert all(fwd(x, causal=c) in shipped for x in (shortest, short64, long64)
               for c in (False, True))
    monkeypatch.setattr(_sm90, "FWD_PERSISTENT", False)
    assert not fwd(short).persistent and not fwd(long).persistent


def test_packed_calls_take_the_hopper_kernels():
    q = FakeArray((1, 4, 3000, 64), "bfloat16")  # (1, H, total, D) views of packed rows
    packed = type("Packed", (), {"batch": 7, "max_seqlen_q": 1000, "max_seqlen_k": 1000})()
    assert fwd(q, packed=packed) is not None and bwd(q, packed=packed) is not None
    packed.batch = 70000  # one grid row per sequence: past the grid's limit
    assert fwd(q, packed=packed) is None and bwd(q, packed=packed) is None
    spec = bwd(q)
    assert _sm90.kv_splits(spec, q, FakeArray((1, 1, 3000, 64)), packed) == 1


@pytest.mark.parametrize("why", ["float32", "scale", "empty q", "empty k",
                                 "head dim 36", "unaligned base", "odd row stride",
                                 "last dim strided", "dv != d"])
def test_other_calls_fall_back(why):
    q = FakeArray((2, 4, 300, 64))
    k = None
    kw = {}
    if why == "float32":
        q = FakeArray((2, 4, 300, 64), "float32")
    elif why == "scale":
        kw["scale"] = -1.0
    elif why == "empty q":
        q = FakeArray((2, 4, 0, 64))
    elif why == "empty k":
        k = FakeArray((2, 4, 0, 64))
    elif why == "head dim 36":
        q = FakeArray((2, 4, 300, 36))
    elif why == "unaligned base":
        q = FakeArray((2, 4, 300, 64), ptr=(1 << 20) + 8)
    elif why == "odd row stride":  # rows of 72 bytes: not a 16-byte multiple
        q = FakeArray((2, 4, 300, 64), strides=(4 * 300 * 72, 300 * 72, 72, 2))
    elif why == "last dim strided":
        q = FakeArray((2, 4, 300, 64), strides=(4 * 300 * 256, 300 * 256, 256, 4))
    if why == "dv != d":
        v = FakeArray((2, 4, 300, 128))
        assert fwd(q, v=v) is None
        return
    assert fwd(q, k, **kw) is None
    assert bwd(q, k, **kw) is None


def test_backward_wide_head_dims():
    """Above d128 the wide kernel (64 keys a block) runs, with every option."""
    for d in (136, 192, 256):
        spec = bwd(FakeArray((2, 4, 300, d)))
        assert spec is not None and spec.wide and spec.head_dim == 256 and spec.block_n == 64
        assert "flash_bwd_sm90_wide_kernel" in spec.name_expression
        assert spec.smem_bytes <= 227 * 1024
    assert bwd(FakeArray((2, 4, 300, 128))).block_n == 128
    assert bwd(FakeArray((2, 4, 300, 264))) is None
    assert bwd(FakeArray((2, 4, 300, 256)), deterministic=True).wide
    for options, dropout in ((True, False), (True, True)):
        spec = _kernels.sm90_bwd_spec("bfloat16", 256, False, options, dropout)
        assert spec.wide and spec.options and spec.dropout == dropout


def test_deterministic_backward_takes_the_hopper_kernel_unsplit(monkeypatch):
    """The deterministic mode runs the sm_90a kernel (dQ tiles summed in key-tile order),
    and never splits GQA groups: split blocks would sum dK and dV by atomics."""
    monkeypatch.setattr(_sm90, "_sm_count", lambda: 132)
    q, k = FakeArray((4, 16, 4096, 128)), FakeArray((4, 2, 4096, 128))
    spec = bwd(q, k, deterministic=True)
    assert spec is not None and spec.deterministic
    assert _sm90.kv_splits(bwd(q, k), q, k) == 8
    assert _sm90.kv_splits(spec, q, k) == 1
    assert _sm90.dq_sem_size(4 * 16 * 4096) == 4 * 16 * 64 * 2  # two per 64-row tile


def test_size_one_dims_ignore_their_strides():
    q = FakeArray((1, 1, 300, 64), strides=(7, 3, 128, 2))  # never-used odd strides
    assert fwd(q) is not None


def test_backward_splits_gqa_groups_only_when_blocks_are_few(monkeypatch):
    monkeypatch.setattr(_sm90, "_sm_count", lambda: 132)
    spec = bwd(FakeArray((4, 16, 4096, 128)))
    kv = lambda hk, L=4096, b=4: FakeArray((b, hk, L, 128))  # noqa: E731
    q = FakeArray((4, 16, 4096, 128))
    assert _sm90.kv_splits(spec, q, kv(16)) == 1          # MHA: 2048 blocks
    assert _sm90.kv_splits(spec, q, kv(2)) == 8           # 8:1, 256 blocks: one head each
    assert _sm90.kv_splits(spec, q, kv(4)) == 4           # 4:1, 512 blocks; 2 gives 1024
    big = FakeArray((4, 16, 65536, 128))
    assert _sm90.kv_splits(spec, big, kv(2, 65536)) == 1  # 4096 blocks already
    assert _sm90.dkv_accum_rows(spec, kv(2, 300)) == 384
