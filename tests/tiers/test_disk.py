"""Disk tier: atomic files, index rebuilt at start, temp files of dead writers, read-only and full disks."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstrata.core import KvstrataError
from kvstrata.tiers import codec
from kvstrata.tiers.disk import DiskTier
from tests.tiers.blocks import BLOB_BYTES, make_block

REPO = Path(__file__).resolve().parents[2]


def block_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.kvb"))


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp"))


def test_file_layout_is_sharded_by_key_hex(tmp_path):
    t = DiskTier(tmp_path)
    b = make_block(1)
    assert t.put(b.key, b.blob())
    h = b.key.hex()
    assert block_files(tmp_path) == [tmp_path / h[:2] / f"{h}.kvb"]
    assert (tmp_path / h[:2] / f"{h}.kvb").read_bytes() == b.blob()
    assert temp_files(tmp_path) == []


def test_index_rebuilt_after_reopen_keeps_blocks_and_recency(tmp_path):
    blocks = [make_block(i) for i in range(4)]
    t = DiskTier(tmp_path, 3 * BLOB_BYTES)
    now = time.time()
    for i, b in enumerate(blocks[:3]):
        t.put(b.key, b.blob())
        os.utime(t.path(b.key), (now - 100 + i, now - 100 + i))  # written 100, 99, 98 seconds ago
    assert t.get(blocks[0].key) is not None  # a hit touches the file: 1 is now the oldest
    t.close()

    t2 = DiskTier(tmp_path, 3 * BLOB_BYTES)
    s = t2.stats()
    assert (s.blocks, s.bytes) == (3, 3 * BLOB_BYTES)
    assert set(t2.keys()) == {b.key for b in blocks[:3]}
    t2.put(blocks[3].key, blocks[3].blob())  # evicts 1, the least recently used before the restart
    assert set(t2.keys()) == {blocks[0].key, blocks[2].key, blocks[3].key}
    for b in (blocks[0], blocks[2], blocks[3]):
        assert bytes(t2.get(b.key)) == b.blob()


def test_temp_file_of_a_killed_writer_is_never_read_as_a_block(tmp_path):
    b = make_block(3)
    survivor = DiskTier(tmp_path)  # an engine that was already running
    # A real writer process, killed (SIGKILL) after writing its temp file and before the rename.
    script = (
        "import os, sys\n"
        "from kvstrata.tiers.disk import DiskTier\n"
        "from tests.tiers.blocks import make_block\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), 9)\n"
        "b = make_block(3)\n"
        "DiskTier(sys.argv[1]).put(b.key, b.blob())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    tmps = temp_files(tmp_path)
    assert len(tmps) == 1 and tmps[0].stat().st_size == len(b.blob())  # whole bytes, but never renamed
    assert block_files(tmp_path) == []
    assert survivor.get(b.key) is None and not survivor.contains(b.key)

    reopened = DiskTier(tmp_path)
    assert temp_files(tmp_path) == []  # stray temp files are removed at start
    assert reopened.get(b.key) is None and reopened.stats().blocks == 0
    assert reopened.put(b.key, b.blob()) and bytes(reopened.get(b.key)) == b.blob()


def test_partial_temp_file_and_foreign_files_are_ignored(tmp_path):
    b = make_block(4)
    shard = tmp_path / b.key.hex()[:2]
    shard.mkdir()
    (shard / f".{b.key.hex()}.123.456.abcd.tmp").write_bytes(b.blob()[:100])
    (shard / "notes.txt").write_text("not a block")
    t = DiskTier(tmp_path)
    assert t.stats().blocks == 0 and t.get(b.key) is None
    assert temp_files(tmp_path) == [] and (shard / "notes.txt").exists()


def test_corrupt_files_are_served_as_stored_and_caught_by_the_codec(tmp_path):
    """The tier returns bytes; verification is the codec's job (the stack's load tests cover discard)."""
    t = DiskTier(tmp_path)
    b = make_block(5)
    t.put(b.key, b.blob())
    p = block_files(tmp_path)[0]
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(codec.ChecksumError):
        codec.verify(t.get(b.key))
    p.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(codec.TruncatedBlockError):
        codec.verify(t.get(b.key))


def test_file_removed_behind_the_tiers_back_is_a_miss(tmp_path):
    t = DiskTier(tmp_path)
    b = make_block(6)
    t.put(b.key, b.blob())
    block_files(tmp_path)[0].unlink()
    assert t.get(b.key) is None
    assert t.stats().blocks == 0 and t.stats().errors == 0


def test_read_only_directory_put_returns_false(readonly_dir):
    t = DiskTier(readonly_dir)
    b = make_block(7)
    assert t.put(b.key, b.blob()) is False
    s = t.stats()
    assert (s.put_failures, s.errors, s.blocks, s.bytes) == (1, 1, 0, 0)
    assert t.get(b.key) is None


@pytest.fixture
def full_dir(tmp_path):
    """A directory that runs out of space: a 64 KiB tmpfs (root), else a per-file size limit."""
    d = tmp_path / "full"
    d.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                            capture_output=True).returncode == 0:
        yield d, "tmpfs"
        subprocess.run(["umount", str(d)], capture_output=True)
        return
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (BLOB_BYTES * 2, old[1]))
    yield d, "rlimit"
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_full_disk_put_returns_false_and_leaves_no_partial_block(full_dir):
    """Full of pinned blocks (nothing to evict on ENOSPC), a put fails whole."""
    d, kind = full_dir
    t = DiskTier(d)
    big = make_block(0)
    results = []
    for i in range(200):
        b = make_block(i)
        blob = b.blob() if kind == "tmpfs" else b.blob() * 3  # over the per-file limit
        results.append(t.put(b.key, blob))
        if not results[-1]:
            break
        t.pin(b.key)
    assert results[-1] is False, "the directory never filled up"
    s = t.stats()
    assert s.put_failures == 1 and s.errors == 1
    assert temp_files(d) == []
    assert len(block_files(d)) == s.blocks == results.count(True)
    for k in t.keys():  # every block that was stored is whole
        codec.verify(t.get(k), expected_key=k)
    assert big.key not in set(t.keys()) or results[0]


def test_path_that_is_a_file_is_a_user_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(KvstrataError, match="directory"):
        DiskTier(f)
