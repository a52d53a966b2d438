"""Disk tier: one file per block in a directory on local SSD, written atomically, LRU-ish under a budget.

Layout: `<root>/<first two hex chars of the key>/<64 hex chars>.kvb`. A block is written to a temporary
file in the same shard directory (`.<hex>.<random>.tmp`), fsynced, then renamed over its final name
(os.replace), so a crash leaves either the whole block or no block, never a partial file under a block
name. At start the index is rebuilt from the files (oldest mtime first: a hit touches the file's
mtime, at most once per TOUCH_AFTER_S, so recency survives restarts) and stray temporary files are
removed. One engine process per directory: the index lives in memory (engines share blocks through
the remote tier).

What the directory may hold besides blocks never stops the tier: at start, entries that vanish
during the scan, dangling symlinks, anything but a regular file under a block name, and files larger
than a block can be (`max_blob_bytes`, checked with stat, never read) are skipped (the oversized ones
deleted); a lookup stats a file before reading it and discards an oversized one. A budget larger
than the filesystem's free space is met on ENOSPC: the least recently used unpinned blocks are
evicted to make room and the write is tried again.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat as statmod
import threading
import time
from collections import OrderedDict
from pathlib import Path

from kvstrata.core import KvstrataError
from kvstrata.tiers.base import LocalIndexTier, check_key

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
TOUCH_AFTER_S = 1.0  # a hit refreshes the file's mtime when it is older than this
_BLOCK_NAME = re.compile(r"^[0-9a-f]{64}\.kvb$")


class DiskTier(LocalIndexTier):
    """Blocks as files under `root`, at most `capacity_bytes` of them (None: no budget).

    `fsync=False` skips the fsync before the rename (faster, still never partial: the rename is
    atomic; a power cut may then lose recent blocks, which is harmless for a cache).
    """

    name = "disk"
    durable = True

    def __init__(self, root: str | os.PathLike, capacity_bytes: int | None = None, *, fsync: bool = True,
                 name: str = "disk", max_blob_bytes: int | None = None) -> None:
        """max_blob_bytes: the largest blob a block can be (codec.max_encoded_bytes); a file above it is
        not read and not kept (None: no bound)."""
        self.name = name
        super().__init__()
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.max_blob_bytes = max_blob_bytes
        self.fsync = fsync
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise KvstrataError(f"disk tier capacity must be > 0 bytes (or None), got {capacity_bytes}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KvstrataError(f"cannot create the KV disk directory {self.root}: {e}; choose a writable path") from e
        if not self.root.is_dir():
            raise KvstrataError(f"KV disk path {self.root} is not a directory; choose a directory")
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size; least recently used first
        self._reserved: dict[bytes, int] = {}  # keys being written -> size (counted in _used)
        self._pins: dict[bytes, int] = {}
        self._used = 0
        self._failures_logged = 0
        self._rebuild_index()

    # ---- files ----

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / (h + SUFFIX)

    def _rebuild_index(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        removed = skipped = 0
        for shard in self.root.iterdir():
            if not (len(shard.name) == 2 and shard.is_dir() and not shard.is_symlink()):
                continue
            try:
                entries = list(os.scandir(shard))
            except OSError as e:  # removed or unreadable meanwhile
                logger.warning("disk tier: cannot list %s: %s", shard, e)
                continue
            for entry in entries:
                if entry.name.endswith(TMP_SUFFIX):  # left by a writer that died before its rename
                    removed += self._unlink(entry.path, "stray temp file")
                elif _BLOCK_NAME.match(entry.name) and entry.name.startswith(shard.name):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:  # removed during the scan
                        skipped += 1
                        continue
                    if not statmod.S_ISREG(st.st_mode):  # a symlink (dangling or not), a directory, ...
                        logger.warning("disk tier: %s is not a regular file; ignored", entry.path)
                        skipped += 1
                    elif self._oversized(st.st_size):
                        logger.warning("disk tier: %s has %d bytes, more than a block can (%d); deleted",
                                       entry.path, st.st_size, self.max_blob_bytes)
                        skipped += 1
                        self._unlink(entry.path, "oversized block file")
                    else:
                        found.append((st.st_mtime, bytes.fromhex(entry.name[:64]), st.st_size))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        logger.info("disk tier %s: %d blocks, %d bytes; %d stray temp files removed, %d entries skipped",
                    self.root, len(self._index), self._used, removed, skipped)

    def _oversized(self, size: int) -> bool:
        return self.max_blob_bytes is not None and size > self.max_blob_bytes

    @staticmethod
    def _unlink(path: str | Path, what: str) -> int:
        try:
            os.unlink(path)
            return 1
        except FileNotFoundError:
            return 0
        except OSError as e:
            logger.warning("disk tier: cannot remove %s %s: %s", what, path, e)
            return 0

    def _read(self, path: Path, nbytes: int | None = None, touch: bool = False) -> bytes:
        """The file's bytes (at most nbytes). OversizedBlob, unread, when it is larger than a block can be;
        a symlink is not followed (OSError). Read straight into an immutable bytes object: no zero-filled
        buffer first, and a restored block's tensor and its promotion to a faster tier share it (a
        bytearray had to be copied for the promotion: two fresh allocations per block on a restore)."""
        with open(path, "rb", buffering=0, opener=_open_nofollow) as f:
            st = os.fstat(f.fileno())
            if not statmod.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            if nbytes is None and self._oversized(st.st_size):
                raise OversizedBlob(st.st_size)
            size = st.st_size if nbytes is None else min(st.st_size, nbytes)
            buf = f.read(size)
            if len(buf) != size:
                raise OSError(f"short read {len(buf)} of {size}")
            if touch and time.time() - st.st_mtime > TOUCH_AFTER_S:
                try:  # recency for the index rebuilt at the next start; coarse, to spare metadata writes
                    os.utime(f.fileno())
                except OSError:
                    pass
        return buf

    def _write_atomic(self, path: Path, blob: bytes | bytearray | memoryview) -> None:
        path.parent.mkdir(exist_ok=True)
        tmp = path.parent / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                mv = memoryview(blob).cast("B")
                while mv:
                    mv = mv[os.write(fd, mv):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # ---- contract ----

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return check_key(key) in self._index

    def get(self, key: bytes) -> bytes | None:
        t0 = time.perf_counter()
        key = check_key(key)
        with self._lock:
            present = key in self._index
            if present:
                self._index.move_to_end(key)
        if not present:
            self._count(misses=1)
            return None
        path = self.path(key)
        try:
            blob = self._read(path, touch=True)
        except FileNotFoundError:  # removed behind our back (cache clear, another tool)
            self._forget(key)
            self._count(misses=1)
            return None
        except OversizedBlob as e:  # cannot be a block: never read, never kept
            logger.warning("disk tier: %s has %d bytes, more than a block can (%d); discarded", path, e.size,
                           self.max_blob_bytes)
            self.remove(key)
            self._count(misses=1, errors=1)
            return None
        except OSError as e:
            logger.warning("disk tier read of %s failed: %s", path, e)
            self._count(misses=1, errors=1)
            return None
        self._count_hit(len(blob), t0)
        return blob

    def peek(self, key: bytes, nbytes: int | None = None) -> bytes | None:
        try:
            return self._read(self.path(check_key(key)), nbytes)
        except OSError:
            return None

    def put(self, key: bytes, blob: bytes | bytearray | memoryview) -> bool:
        t0 = time.perf_counter()
        key, size = check_key(key), len(blob)
        if self._oversized(size):
            self._count(put_failures=1)
            return False
        with self._lock:
            if key in self._index or key in self._reserved:
                if key in self._index:
                    self._index.move_to_end(key)
                return True
            victims = self._make_room(size)
            if victims is None:
                self._count(put_failures=1)
                return False
            for k in victims:
                self._used -= self._index.pop(k)
            self._reserved[key] = size
            self._used += size
        self._evict_files(victims)
        try:
            self._write_full(key, blob)
        except OSError as e:  # disk full, read-only, permissions: the engine carries on without it
            with self._lock:
                self._used -= self._reserved.pop(key)
            self._count(put_failures=1, errors=1)
            self._failures_logged += 1
            if self._failures_logged in (1, 10, 100) or self._failures_logged % 1000 == 0:
                logger.warning("disk tier %s: put failed (%d so far): %s", self.root, self._failures_logged, e)
            return False
        with self._lock:
            self._reserved.pop(key)
            self._index[key] = size
        self._count_put(size, t0)
        return True

    def _write_full(self, key: bytes, blob: bytes | bytearray | memoryview) -> None:
        """Write the block; on ENOSPC (the filesystem is fuller than the budget knows) evict least recently
        used unpinned blocks, twice the block's size at a time, and try again while any are left."""
        while True:
            try:
                return self._write_atomic(self.path(key), blob)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                with self._lock:
                    victims, freed = [], 0
                    for k, s in self._index.items():
                        if freed >= 2 * len(blob):
                            break
                        if not self._pins.get(k):
                            victims.append(k)
                            freed += s
                    for k in victims:
                        self._used -= self._index.pop(k)
                if not victims:
                    raise
                logger.info("disk tier %s: the filesystem is full; evicted %d blocks (%d bytes) to make room",
                            self.root, len(victims), freed)
                self._evict_files(victims)

    def _make_room(self, size: int) -> list[bytes] | None:
        """LRU unpinned keys whose removal lets `size` more bytes fit; None if impossible. Lock held."""
        if self.capacity_bytes is None:
            return []
        if size > self.capacity_bytes:
            return None
        need = self._used + size - self.capacity_bytes
        victims: list[bytes] = []
        for k, s in self._index.items():
            if need <= 0:
                break
            if self._pins.get(k):
                continue
            victims.append(k)
            need -= s
        return victims if need <= 0 else None

    def _evict_files(self, victims: list[bytes]) -> None:
        if not victims:
            return
        listener = self._evict_listener
        out: list[tuple[bytes, bytes | None]] = []
        for k in victims:
            p = self.path(k)
            blob: bytes | None = None
            if listener is not None:
                try:
                    blob = self._read(p)
                except OSError:  # gone, or oversized: nothing to write down
                    pass
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("disk tier could not delete evicted %s: %s", p, e)
                self._count(errors=1)
            out.append((k, blob))
        self._notify_evicted(out)

    def _forget(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
            self._pins.pop(key, None)

    def remove(self, key: bytes) -> None:
        key = check_key(key)
        self._forget(key)
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("disk tier could not delete %s: %s", self.path(key), e)
            self._count(errors=1)

    def _block_index(self) -> dict:
        return self._index

    def _usage(self) -> tuple[int | None, int | None, int | None, int]:
        with self._lock:
            return len(self._index), self._used, self.capacity_bytes, len(self._pins)


class OversizedBlob(OSError):
    """A file under a block name larger than any block can be."""

    def __init__(self, size: int) -> None:
        super().__init__(errno.EFBIG, f"{size} bytes, more than a block can be")
        self.size = size


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
