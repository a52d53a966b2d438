"""What a disk tier directory may hold, or lack, never stops the server (issue 19, defects 5 and 8): dangling
symlinks and files vanishing during the start-up scan, block files larger than a block can be (checked
with stat, never read), and a budget larger than the filesystem (blocks evicted on ENOSPC)."""

from __future__ import annotations

import errno
import os
import time

import pytest
import torch

from kvstrata.tiers import codec
from kvstrata.tiers.disk import DiskTier
from tests.tiers.blocks import BLOB_BYTES, FP, SHAPE, make_block

MAX = codec.max_encoded_bytes(SHAPE, torch.float32, len(FP))


def test_max_encoded_bytes_bounds_every_codec():
    for i, dt in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        b = make_block(i, dtype=dt)
        bound = codec.max_encoded_bytes(SHAPE, dt, len(FP))
        for name in ("raw", "int8"):
            assert len(b.blob(name)) <= bound
    assert MAX < 2 * BLOB_BYTES  # and it is not loose


def test_dangling_symlinks_and_stray_entries_do_not_stop_the_start(tmp_path):
    t = DiskTier(tmp_path)
    good = make_block(1)
    t.put(good.key, good.blob())
    t.close()
    ghost = make_block(2).key.hex()
    shard = tmp_path / ghost[:2]
    shard.mkdir(exist_ok=True)
    (shard / f"{ghost}.kvb").symlink_to(tmp_path / "nowhere")  # dangling
    other = make_block(3).key.hex()
    (tmp_path / other[:2]).mkdir(exist_ok=True)
    (tmp_path / other[:2] / f"{other}.kvb").mkdir()  # a directory under a block name
    (tmp_path / "zz").symlink_to(tmp_path / "gone", target_is_directory=True)  # a dangling shard link
    t = DiskTier(tmp_path)
    assert list(t.keys()) == [good.key] and t.get(good.key) == good.blob()
    assert t.get(bytes.fromhex(ghost)) is None


def test_a_file_removed_during_the_scan_is_skipped(tmp_path, monkeypatch):
    t = DiskTier(tmp_path)
    blocks = [make_block(i) for i in range(4)]
    for b in blocks:
        t.put(b.key, b.blob())
    t.close()
    real_scandir = os.scandir
    victim = t.path(blocks[2].key)

    def racing_scandir(path):
        entries = list(real_scandir(path))
        if victim.exists():
            victim.unlink()  # gone between the listing and its stat, as another process could do
        return iter(entries)

    monkeypatch.setattr(os, "scandir", racing_scandir)
    t = DiskTier(tmp_path)
    assert sorted(t.keys()) == sorted(b.key for b in blocks if b is not blocks[2])


def test_oversized_block_files_are_never_read(tmp_path, monkeypatch):
    """A 3 GB file under a block name (sparse here: no disk used) is dropped at start by its size alone;
    one that grows after the start is discarded on lookup, again without reading it."""
    small = make_block(1)
    t = DiskTier(tmp_path, max_blob_bytes=MAX)
    t.put(small.key, small.blob())
    big = make_block(2)
    t.put(big.key, big.blob())
    t.close()
    with open(t.path(big.key), "r+b") as f:
        f.truncate(3 << 30)
    reads = []
    real_read = DiskTier._read
    monkeypatch.setattr(DiskTier, "_read", lambda self, p, n=None, touch=False: reads.append(p) or
                        real_read(self, p, n, touch))
    t = DiskTier(tmp_path, max_blob_bytes=MAX)
    assert list(t.keys()) == [small.key] and not t.path(big.key).exists()
    with open(t.path(small.key), "r+b") as f:  # grows behind the tier's back
        f.truncate(3 << 30)
    t0 = time.perf_counter()
    assert t.get(small.key) is None
    assert time.perf_counter() - t0 < 1.0 and not t.path(small.key).exists()
    assert list(t.keys()) == [] and t.stats().errors == 1
    assert t.put(big.key, b"x" * (MAX + 1)) is False  # nor is one written
    assert all(os.path.getsize(p) <= MAX for p in reads if os.path.exists(p))


def test_a_budget_larger_than_the_filesystem_evicts_on_enospc(tmp_path, monkeypatch):
    """A 10 GB budget on a filesystem with room for 5 blocks: writes keep succeeding, the oldest unpinned
    blocks make room; once only pinned blocks are left a put fails whole."""
    room = 5 * BLOB_BYTES
    real_write = DiskTier._write_atomic

    def small_fs(self, path, blob):  # the filesystem: ENOSPC past `room` bytes of block files
        used = sum(p.stat().st_size for p in tmp_path.rglob("*.kvb"))
        if used + len(blob) > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, path, blob)

    monkeypatch.setattr(DiskTier, "_write_atomic", small_fs)
    t = DiskTier(tmp_path, 10 << 30)
    blocks = [make_block(i) for i in range(12)]
    assert all(t.put(b.key, b.blob()) for b in blocks)
    kept = set(t.keys())
    assert blocks[-1].key in kept and blocks[0].key not in kept and len(kept) <= 5
    assert t.stats().evictions >= 7 and t.stats().put_failures == 0
    for k in kept:
        assert t.get(k) is not None and t.pin(k)
    for i in range(100, 110):  # pinned blocks only: fill what room is left, then a put fails whole
        b = make_block(i)
        if not t.put(b.key, b.blob()):
            break
        t.pin(b.key)
        kept.add(b.key)
    else:
        raise AssertionError("the filesystem never filled up")
    assert set(t.keys()) == kept and len(kept) == 5 and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root; the ENOSPC test above covers it")
def test_enospc_eviction_on_a_real_small_filesystem(tmp_path):
    import subprocess

    d = tmp_path / "fs"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("tmpfs mount refused")
    try:
        t = DiskTier(d, 10 << 30)
        blocks = [make_block(i) for i in range(64)]
        assert all(t.put(b.key, b.blob()) for b in blocks)
        assert blocks[-1].key in set(t.keys()) and t.stats().evictions > 0
        for k in t.keys():
            codec.verify(t.get(k), expected_key=k)
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)
